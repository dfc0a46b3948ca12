#!/usr/bin/env python3
"""Writes tandem-overview.json, the Grafana dashboard of Tandem's metrics (run it after editing
the panels below; the JSON is what Grafana imports and what CI lints)."""
import json
import pathlib

DS = {"type": "prometheus", "uid": "${datasource}"}
panels = []


def panel(title, unit, targets, kind="timeseries", w=12, h=8, description=""):
    index = len(panels)
    panels.append({
        "id": index + 1,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": (index * w) % 24 if w < 24 else 0, "y": 0},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    })


# Throughput, latency, errors.
panel("Purchases acknowledged per second", "reqps", [
    ('sum(rate(rpc_server_call_duration_seconds_count{job="tandem-merchant-gateway",rpc_method=~"RecordPurchase|RecordPurchases",rpc_grpc_status_code="0"}[1m]))', "calls"),
], description="Successful RecordPurchase and RecordPurchases calls (a bulk call counts once).")
panel("Gateway latency p50 / p99 by method", "s", [
    ('histogram_quantile(0.5, sum by (le, rpc_method) (rate(rpc_server_call_duration_seconds_bucket{job="tandem-merchant-gateway"}[5m])))', "p50 {{rpc_method}}"),
    ('histogram_quantile(0.99, sum by (le, rpc_method) (rate(rpc_server_call_duration_seconds_bucket{job="tandem-merchant-gateway"}[5m])))', "p99 {{rpc_method}}"),
])
panel("Errors by gRPC status", "reqps", [
    ('sum by (job, rpc_grpc_status_code) (rate(rpc_server_call_duration_seconds_count{rpc_grpc_status_code!="0"}[5m]))', "{{job}} code {{rpc_grpc_status_code}}"),
], description="2, 4, 13, 14, 15 are the server's; 3, 5, 6, 7, 9, 16 the client's.")
panel("Readiness", "short", [
    ("tandem_ready", "{{job}}"),
], description="1: SERVING; 0: not ready (Postgres, Kafka or a consumer).")
# Lag and batches.
panel("Consumer lag by group", "short", [
    ("sum by (messaging_consumer_group_name) (messaging_kafka_consumer_lag)", "{{messaging_consumer_group_name}}"),
])
panel("Batch apply time p99 by group", "s", [
    ("histogram_quantile(0.99, sum by (le, messaging_consumer_group_name) (rate(messaging_process_duration_seconds_bucket[5m])))", "{{messaging_consumer_group_name}}"),
])
panel("Outbox: oldest message age", "s", [
    ("max by (db_namespace) (tandem_outbox_oldest_age_seconds)", "{{db_namespace}}"),
])
panel("Outbox: depth and published per second", "short", [
    ("max by (db_namespace) (tandem_outbox_depth)", "waiting {{db_namespace}}"),
    ("sum by (messaging_destination_name) (rate(messaging_client_sent_messages_total[1m]))", "published/s {{messaging_destination_name}}"),
])
# Webhooks.
panel("Webhook attempts per second", "reqps", [
    ("sum by (outcome) (rate(tandem_webhook_attempts_total[5m]))", "{{outcome}}"),
])
panel("Webhook queue", "short", [
    ("max(tandem_webhook_deliveries_pending)", "pending"),
    ("max(tandem_webhook_deliveries_oldest_due_age_seconds)", "oldest due (s)"),
    ("sum(increase(tandem_webhook_endpoints_disabled_total[24h]))", "endpoints disabled (24 h)"),
])
# Money.
panel("Commission per hour by currency (minor units)", "short", [
    ("sum by (currency) (increase(tandem_commission_accrued_total[1h]))", "accrued {{currency}}"),
    ("sum by (currency) (increase(tandem_commission_reversed_total[1h]))", "reversed {{currency}}"),
    ("sum by (currency) (increase(tandem_commission_settled_total[1h]))", "settled {{currency}}"),
], description="Accrued − reversed is what merchants earned; settled is what closed cycles paid before netting.")
panel("Ledger imbalance (must be 0)", "short", [
    ("max by (currency) (abs(tandem_ledger_imbalance))", "{{currency}}"),
], kind="stat")
# Processes.
panel("Resident memory", "bytes", [
    ("process_memory_usage_bytes", "{{job}}"),
])
panel("CPU (cores)", "short", [
    ("sum by (job) (rate(process_cpu_time_seconds_total[1m]))", "{{job}}"),
])

for index, p in enumerate(panels):
    p["gridPos"]["x"] = (index % 2) * 12
    p["gridPos"]["y"] = (index // 2) * 8

dashboard = {
    "uid": "tandem-overview",
    "title": "Tandem overview",
    "description": "Throughput, latency, errors, consumer lag, outbox age, webhook health and money flow of a Tandem deployment.",
    "tags": ["tandem"],
    "timezone": "utc",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "refresh": "10s",
    "time": {"from": "now-1h", "to": "now"},
    "templating": {"list": [{
        "name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
        "current": {}, "hide": 0,
    }]},
    "annotations": {"list": []},
    "panels": panels,
}
path = pathlib.Path(__file__).with_name("tandem-overview.json")
path.write_text(json.dumps(dashboard, indent=2) + "\n")
print(f"wrote {path} ({len(panels)} panels)")
