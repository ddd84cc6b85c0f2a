-- The notifier claims due records channel by channel (shared/notification_deliveries.py `claim_due`). Found through
-- notification_deliveries_due_idx alone, a channel's claim walked past every older due record of other channels:
-- a channel whose receiver hangs piles up thousands, and every other channel's claim paid for them. Per channel,
-- a claim reads only its own due records.
CREATE INDEX notification_deliveries_channel_due_idx ON notification_deliveries (channel_id, next_attempt_at)
    WHERE status = 'pending';
