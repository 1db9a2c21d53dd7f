"""Label Studio: everything roiscribe knows about it, in one place.

- ``labeling``: the labeling config roiscribe writes and reads back (``ConfigSpec``);
- ``convert``: rows -> prediction results, percent <-> pixel boxes, image references (pure);
- ``client``: the API client (label-studio-sdk; writes sent exactly once, reads retried);
- ``push``: rows -> tasks with predictions, in bulk, idempotently, streamed by Parquet batch; or
  task files for a storage sync (``write_task_files``);
- ``pull``: a project's tasks -> images to caption and the boxes annotators drew;
- ``server``: a local Label Studio server in its own virtualenv (tests, benchmark, users).

Importing this package imports neither httpx nor the SDK; the client does, when it is built.
"""

from sinks.label_studio.client import LabelStudio, api_token, checked_token
from sinks.label_studio.convert import (
    ImageRefs, model_version_from_manifest, model_version_of, percent_box_to_pixels, row_to_result,
)
from sinks.label_studio.errors import AuthError, LabelStudioError, TaskError, UnreachableError
from sinks.label_studio.labeling import (
    IMAGE_FIELD, KEY_FIELD, SHA_FIELD, ConfigSpec, labeling_config, spec_from_config, spec_from_rows,
)
from sinks.label_studio.pull import PulledItem, PulledTasks, pull_tasks
from sinks.label_studio.push import OutputRows, PushConfig, PushReport, push, write_task_files

__all__ = [
    "LabelStudio", "LabelStudioError", "AuthError", "UnreachableError", "TaskError", "api_token", "ImageRefs",
    "PushConfig", "PushReport", "push", "ConfigSpec", "spec_from_config", "spec_from_rows", "labeling_config",
    "row_to_result", "model_version_of", "IMAGE_FIELD", "KEY_FIELD", "percent_box_to_pixels", "pull_tasks",
    "PulledTasks", "PulledItem", "checked_token", "model_version_from_manifest", "SHA_FIELD", "OutputRows",
    "write_task_files",
]
