"""The core's one error type for bad settings and models a surgery cannot rewrite."""


class SurgeryError(ValueError):
    """Bad settings or a model the surgery cannot rewrite: one line, naming the algorithm (``.algorithm``) and the
    argument or module. Nothing has been changed when it is raised. (A ``ValueError``, so callers that caught those
    before keep working.)"""

    def __init__(self, algorithm: str, message: str):
        super().__init__(f"{algorithm}: {message}")
        self.algorithm = algorithm


class NothingToRewrite(SurgeryError):
    """Raised by ``Surgery.check_model``: the model holds nothing this surgery can rewrite, for a reason the user
    should hear (e.g. the model *is* the block, and the root cannot be replaced). The core turns it into Composer's
    ``NoEffectWarning`` and leaves the model unchanged, or raises it with ``strict=True``."""
