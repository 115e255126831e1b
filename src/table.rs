//! Plain-text tables for the CLI (`key list`, `audit`): each column as wide
//! as its widest cell, two spaces between columns, no trailing blanks.

/// The table of `rows` (the header first).
pub fn columns<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_line_up_without_trailing_blanks() {
        let rows = [
            ["ID", "NOTE"].map(str::to_owned),
            ["abc", ""].map(str::to_owned),
            ["a", "retired"].map(str::to_owned),
        ];
        assert_eq!(super::columns(&rows), "ID   NOTE\nabc\na    retired\n");
    }
}
