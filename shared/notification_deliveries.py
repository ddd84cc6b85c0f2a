"""`notification_deliveries`: one record per notification channel and event (CONTRACT §7). This module is the only
one that writes the table (docs/architecture.md, "Who writes which table")."""
