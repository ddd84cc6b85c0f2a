-- Checks that say what healthy means (CONTRACT §3, §4): http conditions (CEL) and certificate limits, dns
-- and grpc checks, each result's certificate end of validity, and hourly counts behind uptime_24h.

ALTER TABLE health_checks DROP CONSTRAINT health_checks_check_type_check;
ALTER TABLE health_checks ADD CONSTRAINT health_checks_check_type_check
    CHECK (check_type IN ('service', 'http', 'tcp', 'dns', 'grpc'));

ALTER TABLE health_checks
    -- http
    ADD COLUMN condition text CHECK (char_length(condition) BETWEEN 1 AND 1000),
    ADD COLUMN min_cert_days integer CHECK (min_cert_days BETWEEN 0 AND 3650),
    -- dns
    ADD COLUMN dns_name text,
    ADD COLUMN record_type text CHECK (record_type IN ('A', 'AAAA', 'CNAME', 'MX', 'TXT', 'NS', 'SRV')),
    ADD COLUMN expected_values text[],
    ADD COLUMN dns_server text,
    -- grpc (with port, address and ignore_cert_errors)
    ADD COLUMN grpc_service text,
    ADD COLUMN tls boolean;

-- A check holds only its own type's fields.
ALTER TABLE health_checks DROP CONSTRAINT health_checks_fields_match_type;
ALTER TABLE health_checks ADD CONSTRAINT health_checks_fields_match_type CHECK (
    CASE check_type
        WHEN 'service' THEN service_name IS NOT NULL
            AND num_nonnulls(url, method, expected_status, expected_body, ignore_cert_errors, follow_redirects,
                             basic_auth_user, basic_auth_pass_encrypted, port, address, condition, min_cert_days,
                             dns_name, record_type, expected_values, dns_server, grpc_service, tls) = 0
        WHEN 'http' THEN url IS NOT NULL AND method IS NOT NULL AND expected_status IS NOT NULL
            AND ignore_cert_errors IS NOT NULL AND follow_redirects IS NOT NULL
            AND num_nonnulls(service_name, port, address, dns_name, record_type, expected_values, dns_server,
                             grpc_service, tls) = 0
            AND (basic_auth_pass_encrypted IS NULL OR basic_auth_user IS NOT NULL)
        WHEN 'tcp' THEN port IS NOT NULL
            AND num_nonnulls(service_name, url, method, expected_status, expected_body, ignore_cert_errors,
                             follow_redirects, basic_auth_user, basic_auth_pass_encrypted, condition,
                             min_cert_days, dns_name, record_type, expected_values, dns_server, grpc_service,
                             tls) = 0
        WHEN 'dns' THEN dns_name IS NOT NULL AND record_type IS NOT NULL
            AND num_nonnulls(service_name, url, method, expected_status, expected_body, ignore_cert_errors,
                             follow_redirects, basic_auth_user, basic_auth_pass_encrypted, port, address,
                             condition, min_cert_days, grpc_service, tls) = 0
        WHEN 'grpc' THEN port IS NOT NULL AND grpc_service IS NOT NULL AND tls IS NOT NULL
            AND ignore_cert_errors IS NOT NULL
            AND num_nonnulls(service_name, url, method, expected_status, expected_body, follow_redirects,
                             basic_auth_user, basic_auth_pass_encrypted, condition, min_cert_days, dns_name,
                             record_type, expected_values, dns_server) = 0
    END
);

-- CONTRACT §4: the server certificate's end of validity for TLS checks, else null.
ALTER TABLE check_results ADD COLUMN cert_expires_at timestamptz;
ALTER TABLE check_state ADD COLUMN last_cert_expires_at timestamptz;

-- CONTRACT §3 uptime_24h without reading a day of results per request: the pollers count each check's
-- results per hour in the batch that stores them (owner: shared/uptime.py); the pruner drops old hours.
CREATE TABLE check_uptime_hours (
    check_id uuid NOT NULL REFERENCES health_checks (id) ON DELETE CASCADE,
    hour timestamptz NOT NULL,
    healthy integer NOT NULL CHECK (healthy >= 0),
    total integer NOT NULL CHECK (total >= healthy),
    PRIMARY KEY (check_id, hour)
);
