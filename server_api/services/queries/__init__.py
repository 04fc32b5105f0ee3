"""Every query of the service layer, in one place: this package. Services call ``queries.<name>``.

- :mod:`.hot_path`: authentication, check-in and upload intake as prepared Core statements on the
  driver's connection;
- :mod:`.checkin_statement`: PostgreSQL's check-in in one statement;
- :mod:`.records`: ORM queries of rounds (and their aggregation leases), tasks, devices and model versions;
- :mod:`.secure`: the rows of secure-aggregation rounds.
"""

from __future__ import annotations

from server_api.services.queries._tables import ACTIVE
from server_api.services.queries.checkin_statement import CheckinDone, checkin_at_once
from server_api.services.queries.hot_path import (
    ActiveRound,
    CheckinView,
    UploadView,
    checkin_view,
    device_token_hash,
    insert_device,
    record_update,
    replace_upload_token,
    take_assignment,
    touch_device,
    upload_view,
    version_blob,
)
from server_api.services.queries.records import (
    active_round,
    assignment_of,
    blob_referenced,
    claim_assignment_slot,
    count_devices,
    count_report,
    devices_page,
    finish_aggregation,
    finish_round,
    first_base_version,
    model_versions,
    next_round_number,
    participants_of,
    pick_task,
    renew_aggregation,
    rounds_needing_attention,
    rounds_of,
    running_tasks_without_active_round,
    set_task_status,
    start_aggregation,
    tasks,
    updates_of,
    version_metrics,
)
from server_api.services.queries.secure import (
    record_masked_update,
    secagg_inbox,
    secagg_members,
    secagg_reveals,
    secagg_round_ids,
    secagg_state,
    uploaders_of,
)

__all__ = [
    "ACTIVE",
    "ActiveRound",
    "CheckinDone",
    "CheckinView",
    "UploadView",
    "active_round",
    "assignment_of",
    "blob_referenced",
    "checkin_at_once",
    "checkin_view",
    "claim_assignment_slot",
    "count_devices",
    "count_report",
    "device_token_hash",
    "devices_page",
    "finish_aggregation",
    "finish_round",
    "first_base_version",
    "insert_device",
    "model_versions",
    "next_round_number",
    "participants_of",
    "pick_task",
    "record_masked_update",
    "record_update",
    "renew_aggregation",
    "replace_upload_token",
    "rounds_needing_attention",
    "rounds_of",
    "running_tasks_without_active_round",
    "secagg_inbox",
    "secagg_members",
    "secagg_reveals",
    "secagg_round_ids",
    "secagg_state",
    "set_task_status",
    "start_aggregation",
    "take_assignment",
    "tasks",
    "touch_device",
    "updates_of",
    "upload_view",
    "uploaders_of",
    "version_blob",
    "version_metrics",
]
