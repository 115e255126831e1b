// Progressive enhancement: a Copy button for the session key. Without
// JavaScript the key is still there, selectable, in a read-only text area.
(function () {
  var button = document.getElementById("copy");
  var field = document.getElementById("session-key");
  if (!button || !field) return;
  button.hidden = false;
  button.addEventListener("click", function () {
    field.select();
    var done = function () { button.textContent = "Copied"; };
    if (navigator.clipboard && navigator.clipboard.writeText) {
      navigator.clipboard.writeText(field.value).then(done, function () { document.execCommand("copy"); done(); });
    } else {
      document.execCommand("copy");
      done();
    }
  });
})();
