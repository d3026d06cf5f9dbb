"""DuckDB schema of perf_pipeline, created and upgraded by numbered migrations.

`migrate(con)` applies every migration the database has not seen yet, each in its own
transaction, and records it in `schema_version`; running it again is a no-op. A later change
adds a migration to the end of MIGRATIONS, so existing databases upgrade in place.

Keys and indexes: `performance_metrics` carries no primary key or ART index. Rows arrive
in day order, a range of days per load, and every query filters on a time range, which DuckDB
answers from its min/max zone maps; an ART index would cost on every bulk insert and
nothing on these scans (measured in docs/architecture.md).
"""

from __future__ import annotations

import duckdb

MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "performance metrics, bookkeeping, normalized series and trend statistics", (
        "CREATE SEQUENCE IF NOT EXISTS performance_metrics_id_seq",
        """
        CREATE TABLE performance_metrics (
            id BIGINT NOT NULL DEFAULT nextval('performance_metrics_id_seq'),
            timestamp TIMESTAMP NOT NULL,
            metric_name VARCHAR NOT NULL,
            metric_value DOUBLE NOT NULL,
            test_name VARCHAR,
            test_type VARCHAR,
            node_id VARCHAR NOT NULL,
            node_type VARCHAR,
            test_run_id VARCHAR,
            ci_job_id VARCHAR,
            context_data JSON,
            unit VARCHAR,
            source_file VARCHAR NOT NULL,
            source_line INTEGER NOT NULL
        )
        """,
        """
        CREATE TABLE quarantined_metrics (
            partition_day DATE NOT NULL,
            source_file VARCHAR NOT NULL,
            source_line INTEGER NOT NULL,
            raw_record VARCHAR,
            reason VARCHAR NOT NULL,
            quarantined_at TIMESTAMP NOT NULL
        )
        """,
        """
        CREATE TABLE ingested_files (
            partition_day DATE NOT NULL,
            path VARCHAR NOT NULL,
            checksum VARCHAR NOT NULL,
            size_bytes BIGINT NOT NULL,
            rows_read BIGINT NOT NULL,
            rows_loaded BIGINT NOT NULL,
            rows_quarantined BIGINT NOT NULL,
            status VARCHAR NOT NULL,
            loaded_at TIMESTAMP NOT NULL,
            PRIMARY KEY (partition_day, path)
        )
        """,
        """
        CREATE TABLE metric_catalog (
            metric_name VARCHAR PRIMARY KEY,
            category VARCHAR NOT NULL,
            unit VARCHAR NOT NULL,
            direction VARCHAR NOT NULL,
            importance VARCHAR NOT NULL,
            alert_threshold_percent DOUBLE NOT NULL,
            scope VARCHAR NOT NULL,
            min_value DOUBLE,
            max_value DOUBLE,
            description VARCHAR
        )
        """,
        """
        CREATE TABLE metric_aliases (
            alias VARCHAR PRIMARY KEY,
            metric_name VARCHAR NOT NULL,
            alias_unit VARCHAR
        )
        """,
        """
        CREATE TABLE metric_units (
            metric_name VARCHAR NOT NULL,
            unit VARCHAR NOT NULL,
            factor DOUBLE NOT NULL,
            PRIMARY KEY (metric_name, unit)
        )
        """,
        """
        CREATE TABLE normalized_timeseries (
            timestamp TIMESTAMP NOT NULL,
            metric_name VARCHAR NOT NULL,
            test_name VARCHAR,
            test_type VARCHAR,
            node_id VARCHAR NOT NULL,
            node_type VARCHAR,
            test_run_id VARCHAR,
            ci_job_id VARCHAR,
            commit_sha VARCHAR,
            value DOUBLE NOT NULL,
            sample_count INTEGER NOT NULL
        )
        """,
        """
        CREATE TABLE metric_rollups_hourly (
            hour TIMESTAMP NOT NULL,
            metric_name VARCHAR NOT NULL,
            test_name VARCHAR,
            test_type VARCHAR,
            node_id VARCHAR NOT NULL,
            node_type VARCHAR,
            sample_count BIGINT NOT NULL,
            mean DOUBLE NOT NULL,
            min DOUBLE NOT NULL,
            max DOUBLE NOT NULL,
            p50 DOUBLE NOT NULL,
            p95 DOUBLE NOT NULL
        )
        """,
        """
        CREATE TABLE trend_stats (
            computed_at TIMESTAMP NOT NULL,
            window_start TIMESTAMP NOT NULL,
            window_end TIMESTAMP NOT NULL,
            scope VARCHAR NOT NULL,
            metric_name VARCHAR NOT NULL,
            test_name VARCHAR,
            node_id VARCHAR,
            level_basis VARCHAR NOT NULL,
            unit VARCHAR NOT NULL,
            direction VARCHAR NOT NULL,
            n_points BIGINT NOT NULL,
            n_days INTEGER NOT NULL,
            window_mean DOUBLE,
            ols_slope_per_day DOUBLE,
            ols_p_value DOUBLE,
            theil_sen_slope_per_day DOUBLE,
            theil_sen_low DOUBLE,
            theil_sen_high DOUBLE,
            mann_kendall_tau DOUBLE,
            mann_kendall_p_value DOUBLE,
            p_value_adjusted DOUBLE,
            change_rate_percent DOUBLE,
            change_over_window_percent DOUBLE,
            seasonally_adjusted BOOLEAN NOT NULL,
            moving_average_7d DOUBLE,
            ewma DOUBLE,
            trend_direction VARCHAR NOT NULL,
            is_significant BOOLEAN NOT NULL
        )
        """,
    )),
    (2, "change points and the incidents they form", (
        """
        CREATE TABLE change_points (
            computed_at TIMESTAMP NOT NULL,
            scope VARCHAR NOT NULL,
            metric_name VARCHAR NOT NULL,
            test_name VARCHAR,
            node_id VARCHAR,
            timestamp TIMESTAMP NOT NULL,
            first_test_run_id VARCHAR,
            first_ci_job_id VARCHAR,
            first_commit VARCHAR,
            before DOUBLE NOT NULL,
            after DOUBLE NOT NULL,
            magnitude_percent DOUBLE,
            p_value DOUBLE NOT NULL,
            effect_size DOUBLE NOT NULL,
            kind VARCHAR NOT NULL,
            shape VARCHAR NOT NULL,
            end_timestamp TIMESTAMP,
            n_points BIGINT NOT NULL,
            incident_id VARCHAR
        )
        """,
        """
        CREATE TABLE change_incidents (
            computed_at TIMESTAMP NOT NULL,
            incident_id VARCHAR NOT NULL,
            attribution VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,
            timestamp TIMESTAMP NOT NULL,
            first_test_run_id VARCHAR,
            first_commit VARCHAR,
            node_id VARCHAR,
            metrics VARCHAR[] NOT NULL,
            tests VARCHAR[] NOT NULL,
            series BIGINT NOT NULL,
            worst_magnitude_percent DOUBLE
        )
        """,
    )),
    (3, "daily and weekly seasonal profiles", (
        """
        CREATE TABLE seasonal_profiles (
            computed_at TIMESTAMP NOT NULL,
            metric_name VARCHAR NOT NULL,
            node_id VARCHAR,
            cycle VARCHAR NOT NULL,
            phase INTEGER NOT NULL,
            effect DOUBLE NOT NULL,
            strength DOUBLE NOT NULL,
            n_hours BIGINT NOT NULL
        )
        """,
    )),
    (4, "anomalies, node health, correlations, configuration effects, regression causes", (
        """
        CREATE TABLE anomalies (
            computed_at TIMESTAMP NOT NULL,
            scope VARCHAR NOT NULL,
            metric_name VARCHAR NOT NULL,
            test_name VARCHAR,
            node_id VARCHAR,
            timestamp TIMESTAMP NOT NULL,
            end_timestamp TIMESTAMP NOT NULL,
            test_run_id VARCHAR,
            kind VARCHAR NOT NULL,
            score DOUBLE NOT NULL,
            value DOUBLE NOT NULL,
            expected DOUBLE,
            reason VARCHAR NOT NULL
        )
        """,
        """
        CREATE TABLE node_health (
            computed_at TIMESTAMP NOT NULL,
            node_id VARCHAR NOT NULL,
            day DATE NOT NULL,
            outlier_score DOUBLE,
            is_outlier BOOLEAN NOT NULL,
            reason VARCHAR
        )
        """,
        """
        CREATE TABLE metric_correlations (
            computed_at TIMESTAMP NOT NULL,
            grain VARCHAR NOT NULL,
            metric_a VARCHAR NOT NULL,
            metric_b VARCHAR NOT NULL,
            n BIGINT NOT NULL,
            pearson_r DOUBLE NOT NULL,
            pearson_p DOUBLE NOT NULL,
            spearman_rho DOUBLE NOT NULL,
            spearman_p DOUBLE NOT NULL,
            q_value DOUBLE NOT NULL,
            flagged BOOLEAN NOT NULL
        )
        """,
        """
        CREATE TABLE configuration_effects (
            computed_at TIMESTAMP NOT NULL,
            metric_name VARCHAR NOT NULL,
            factor VARCHAR NOT NULL,
            groups INTEGER NOT NULL,
            n BIGINT NOT NULL,
            statistic DOUBLE NOT NULL,
            p_value DOUBLE NOT NULL,
            q_value DOUBLE NOT NULL,
            effect_size DOUBLE NOT NULL,
            flagged BOOLEAN NOT NULL,
            detail VARCHAR NOT NULL
        )
        """,
        """
        CREATE TABLE regression_causes (
            computed_at TIMESTAMP NOT NULL,
            incident_id VARCHAR NOT NULL,
            rank INTEGER NOT NULL,
            cause_type VARCHAR NOT NULL,
            cause VARCHAR NOT NULL,
            score DOUBLE NOT NULL,
            evidence VARCHAR NOT NULL
        )
        """,
    )),
    (5, "models, forecasts, node scores and risk, recommendations and actions", (
        """
        CREATE TABLE performance_models (
            trained_at TIMESTAMP NOT NULL,
            metric_name VARCHAR NOT NULL,
            rows BIGINT NOT NULL,
            series BIGINT NOT NULL,
            folds INTEGER NOT NULL,
            cv_mae DOUBLE,
            baseline_mae DOUBLE,
            best_baseline VARCHAR,
            baseline_errors JSON,
            method VARCHAR NOT NULL,
            reason VARCHAR NOT NULL,
            interval_coverage DOUBLE,
            file VARCHAR
        )
        """,
        """
        CREATE TABLE performance_forecasts (
            computed_at TIMESTAMP NOT NULL,
            metric_name VARCHAR NOT NULL,
            scope VARCHAR NOT NULL,
            series VARCHAR NOT NULL,
            timestamp TIMESTAMP NOT NULL,
            forecast DOUBLE NOT NULL,
            lower DOUBLE,
            upper DOUBLE,
            method VARCHAR NOT NULL
        )
        """,
        """
        CREATE TABLE node_performance_scores (
            computed_at TIMESTAMP NOT NULL,
            node_id VARCHAR NOT NULL,
            metric_name VARCHAR NOT NULL,
            test_type VARCHAR,
            score DOUBLE NOT NULL,
            rank INTEGER NOT NULL,
            effect DOUBLE,
            noise DOUBLE,
            n_points BIGINT NOT NULL,
            n_tests BIGINT NOT NULL,
            evidence VARCHAR NOT NULL
        )
        """,
        """
        CREATE TABLE node_health_risk (
            computed_at TIMESTAMP NOT NULL,
            node_id VARCHAR NOT NULL,
            metric_name VARCHAR NOT NULL,
            current_value DOUBLE NOT NULL,
            limit_value DOUBLE NOT NULL,
            slope_per_day DOUBLE,
            days_to_limit DOUBLE,
            predicted_crossing TIMESTAMP,
            earliest_crossing TIMESTAMP,
            risk_score DOUBLE NOT NULL,
            node_risk_score DOUBLE NOT NULL,
            evidence VARCHAR NOT NULL
        )
        """,
        """
        CREATE TABLE optimization_recommendations (
            computed_at TIMESTAMP NOT NULL,
            recommendation_id VARCHAR NOT NULL,
            condition_key VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,
            severity VARCHAR NOT NULL,
            subject VARCHAR NOT NULL,
            title VARCHAR NOT NULL,
            action VARCHAR NOT NULL,
            evidence VARCHAR NOT NULL,
            evidence_json JSON NOT NULL,
            expected_gain VARCHAR NOT NULL,
            expected_gain_percent DOUBLE,
            node_id VARCHAR,
            metric_name VARCHAR,
            incident_id VARCHAR
        )
        """,
        """
        CREATE TABLE optimization_actions (
            decided_at TIMESTAMP NOT NULL,
            condition_key VARCHAR NOT NULL,
            recommendation_id VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,
            subject VARCHAR NOT NULL,
            handler VARCHAR,
            decision VARCHAR NOT NULL,
            reason VARCHAR NOT NULL,
            detail VARCHAR NOT NULL
        )
        """,
    )),
    (6, "regression alert outbox and per-channel delivery state", (
        """
        CREATE TABLE regression_alerts (
            alert_id VARCHAR PRIMARY KEY,
            dedup_key VARCHAR NOT NULL,
            incident_id VARCHAR NOT NULL,
            attribution VARCHAR NOT NULL,
            severity VARCHAR NOT NULL,
            title VARCHAR NOT NULL,
            metric_name VARCHAR NOT NULL,
            unit VARCHAR NOT NULL,
            direction VARCHAR NOT NULL,
            tests VARCHAR[] NOT NULL,
            node_id VARCHAR,
            before DOUBLE NOT NULL,
            after DOUBLE NOT NULL,
            magnitude_percent DOUBLE NOT NULL,
            p_value DOUBLE NOT NULL,
            first_test_run_id VARCHAR,
            first_commit VARCHAR,
            started_at TIMESTAMP NOT NULL,
            suspected_cause VARCHAR,
            cause_evidence VARCHAR,
            status VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL,
            updated_at TIMESTAMP NOT NULL,
            resolved_at TIMESTAMP,
            status_note VARCHAR NOT NULL
        )
        """,
        """
        CREATE TABLE alert_deliveries (
            alert_id VARCHAR NOT NULL,
            channel VARCHAR NOT NULL,
            state VARCHAR NOT NULL,
            attempts INTEGER NOT NULL,
            next_attempt_at TIMESTAMP,
            last_attempt_at TIMESTAMP,
            sent_at TIMESTAMP,
            last_error VARCHAR,
            PRIMARY KEY (alert_id, channel)
        )
        """,
    )),
    (7, "the days normalized_timeseries was rebuilt for since raw_metrics last loaded them", (
        """
        CREATE TABLE normalized_days (
            partition_day DATE PRIMARY KEY,
            normalized_at TIMESTAMP NOT NULL
        )
        """,
        # Databases from before this table: every loaded day is taken as normalized.
        "INSERT INTO normalized_days SELECT DISTINCT partition_day, now()::TIMESTAMP FROM ingested_files",
    )),
)

LATEST_VERSION = MIGRATIONS[-1][0]


def current_version(con: duckdb.DuckDBPyConnection) -> int:
    con.execute("CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, description VARCHAR, applied_at TIMESTAMP)")
    (version,), = con.execute("SELECT max(version) FROM schema_version").fetchall()
    return int(version) if version is not None else 0


def migrate(con: duckdb.DuckDBPyConnection) -> int:
    """Apply the migrations this database lacks; returns the version it is now at."""
    version = current_version(con)
    if version > LATEST_VERSION:
        raise RuntimeError(f"database schema version {version} is newer than this perf_pipeline "
                           f"({LATEST_VERSION}); upgrade perf_pipeline")
    for number, description, statements in MIGRATIONS:
        if number <= version:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            for statement in statements:
                con.execute(statement)
            con.execute("INSERT INTO schema_version VALUES (?, ?, now()::TIMESTAMP)",
                        [number, description])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        version = number
    return version
