//! How `credproxy audit` prints the trail.

use super::AuditRow;

/// A JSON array of [`AuditRow::view`], as `GET /admin/audit` answers.
pub fn rows_json(rows: &[AuditRow]) -> String {
    let views: Vec<_> = rows.iter().map(AuditRow::view).collect();
    serde_json::to_string_pretty(&views).unwrap_or_else(|_| "[]".to_owned())
}

/// A table: seq, time, kind, session, actor, instance, detail.
pub fn rows_table(rows: &[AuditRow]) -> String {
    let mut lines: Vec<[String; 7]> = vec![[
        "SEQ".into(),
        "AT".into(),
        "KIND".into(),
        "SESSION".into(),
        "ACTOR".into(),
        "INSTANCE".into(),
        "DETAIL".into(),
    ]];
    for r in rows {
        lines.push([
            r.seq.to_string(),
            super::rfc3339_ms(r.at),
            r.kind.clone(),
            r.session_id.clone().unwrap_or_else(|| "-".into()),
            r.actor.clone(),
            r.instance.clone(),
            r.detail.clone(),
        ]);
    }
    crate::table::columns(&lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_has_a_header_and_a_line_per_row() {
        let row = AuditRow {
            seq: 1,
            at: 0,
            instance: "h:1".into(),
            kind: "session.created".into(),
            session_id: None,
            actor: "cli".into(),
            detail: "{}".into(),
            key_id: "00000000".into(),
            prev_mac: vec![0; 32],
            mac: vec![1; 32],
        };
        let t = rows_table(std::slice::from_ref(&row));
        assert_eq!(t.lines().count(), 2, "{t}");
        assert!(t.lines().nth(1).unwrap().starts_with("1  "), "{t}");
        let j: serde_json::Value = serde_json::from_str(&rows_json(&[row])).unwrap();
        assert_eq!(j[0]["kind"], "session.created");
        assert_eq!(j[0]["detail"], serde_json::json!({}));
    }
}
