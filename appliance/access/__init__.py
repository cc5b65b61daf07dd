"""Who may do what, who did what: users and keys, the read rule and its forms, actors, policy changes, the audit log."""
