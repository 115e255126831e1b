//! The audit trail over the store: appending the rows the control plane
//! writes itself (key commands, admin calls) and verifying the chain. The
//! rows, the chain and its check are `audit/`'s, below the store; this
//! reads and writes the store, above it.

use crate::audit::{Actor, AuditAppend, AuditEntry, AuditSigner, Verdict, Verifier};
use crate::secrets::seal::Sealer;
use crate::store::{Store, StoreError};

/// Rows [`verify`] reads at once.
const VERIFY_PAGE: u32 = 1000;

/// Appends one row in a transaction of its own (key commands, admin calls,
/// request counts); returns its `seq`.
pub async fn append(
    store: &dyn Store,
    sealer: &Sealer,
    entry: AuditEntry,
) -> Result<i64, StoreError> {
    store
        .append_audit(&AuditAppend::new(entry, AuditSigner::of(sealer)))
        .await
}

/// Records a key command (`kind`: [`crate::audit::kind::KEY_ROTATED`],
/// [`crate::audit::kind::KEY_REWRAPPED`] or [`crate::audit::kind::KEY_RETIRED`]) by the CLI, chained
/// under `sealer`'s primary key: call it with the ring as it is after the
/// change (a rotation's row is chained under the new primary). `detail`
/// holds key ids and counts, never a key.
pub async fn record_key_event(
    store: &dyn Store,
    sealer: &Sealer,
    kind: &str,
    detail: serde_json::Value,
) -> Result<i64, StoreError> {
    append(
        store,
        sealer,
        AuditEntry::new(kind, None, Actor::Cli, detail),
    )
    .await
}

/// Walks the whole chain in `seq` order, `VERIFY_PAGE` rows at a time, and
/// checks it ([`Verifier`] says how). `progress` is called after each page
/// with the rows checked so far.
pub async fn verify(
    store: &dyn Store,
    sealer: &Sealer,
    mut progress: impl FnMut(u64),
) -> Result<Verdict, StoreError> {
    let mut verifier = Verifier::new(sealer);
    loop {
        let page = store.audit_page(verifier.after(), VERIFY_PAGE).await?;
        if page.is_empty() {
            return Ok(verifier.finish());
        }
        if let Some(broken) = verifier.feed(page) {
            return Ok(broken);
        }
        progress(verifier.checked());
    }
}
