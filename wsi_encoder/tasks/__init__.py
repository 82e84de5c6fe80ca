"""The task library: labelled histopathology datasets behind ``@register_task``.

``list_tasks()``, ``get_task(name)`` and ``load_task(name, path, **options)`` give the registered
tasks (built-ins: BreaKHis malignancy/subtype/magnification, Kather CRC, PatchCamelyon, image folder,
CSV list, patch store). Importing this package does not import torch.
"""

from wsi_encoder.tasks.data import TaskData
from wsi_encoder.tasks.registry import TaskSpec, get_task, list_tasks, load_task, register_task

__all__ = ["TaskData", "TaskSpec", "get_task", "list_tasks", "load_task", "register_task"]
