"""The model repository: model files and their metadata in one folder, the single place models come from, and the
control plane's desired state beside them (``control.ControlStore``)."""

from .control import ControlStore, Desired, pid_alive
from .remote import RemoteRepository, open_repository
from .store import NAME_RE, ModelRepository, check_name, kind_of

__all__ = ["NAME_RE", "ControlStore", "Desired", "ModelRepository", "RemoteRepository", "check_name", "kind_of",
           "open_repository", "pid_alive"]
