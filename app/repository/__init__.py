"""The model repository: model files and their metadata in one folder, the single place models come from."""

from .store import NAME_RE, ModelRepository, check_name, kind_of

__all__ = ["NAME_RE", "ModelRepository", "check_name", "kind_of"]
