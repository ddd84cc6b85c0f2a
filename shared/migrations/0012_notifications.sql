-- Notifications (CONTRACT §7): channels (owner: shared/notification_channels.py) and one delivery record per
-- channel and event (owner: shared/notification_deliveries.py).

CREATE TABLE notification_channels (
    id uuid PRIMARY KEY,
    name text NOT NULL UNIQUE CHECK (char_length(name) BETWEEN 1 AND 100),
    type text NOT NULL CHECK (type IN ('webhook', 'slack')),
    -- A slack URL holds its token: never shown whole (shared/notification_channels.py masks it).
    url text NOT NULL,
    -- The Standard Webhooks secret ("whsec_" + base64), AES-GCM with the key file, bound to the channel id.
    secret_encrypted bytea,
    events text[] NOT NULL CHECK (cardinality(events) >= 1),
    groups text[] NOT NULL DEFAULT '{}',
    include_maintenance boolean NOT NULL DEFAULT false,
    enabled boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT notification_channels_secret_of_webhooks CHECK ((type = 'webhook') = (secret_encrypted IS NOT NULL))
);

-- One record per (channel, event id), written before the first attempt: the primary key is what makes a duplicate
-- event, or several notifiers, deliver once. `body` is the event's CloudEvent as published, and `slack_text` the
-- Slack line made when the record was made (with the host's name and failing checks then; null when the channel was
-- a webhook): each attempt POSTs what the channel's type is at that moment, so a channel whose type changes while
-- a delivery is retried gets its new format. The signature is made at each attempt (its timestamp is the
-- attempt's). next_attempt_at is the timer: a pending record is due when it has passed; a notifier that claims one
-- moves it past the attempt's timeout (a lease), so that a notifier killed mid-attempt leaves it to another.
CREATE TABLE notification_deliveries (
    channel_id uuid NOT NULL REFERENCES notification_channels (id) ON DELETE CASCADE,
    event_id uuid NOT NULL,
    event_type text NOT NULL,
    body bytea NOT NULL,
    slack_text text,
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz,
    last_attempt_at timestamptz,
    status_code integer,
    detail text,
    PRIMARY KEY (channel_id, event_id),
    CONSTRAINT notification_deliveries_timer CHECK ((status = 'pending') = (next_attempt_at IS NOT NULL))
);
CREATE INDEX notification_deliveries_due_idx ON notification_deliveries (next_attempt_at) WHERE status = 'pending';
-- A channel's deliveries, newest first (GET /notification-channels/{id}/deliveries), and pruning by age.
CREATE INDEX notification_deliveries_channel_idx ON notification_deliveries (channel_id, created_at DESC, event_id);
CREATE INDEX notification_deliveries_created_idx ON notification_deliveries (created_at) WHERE status <> 'pending';
