"""The error types for bad settings: ``AlgorithmError`` for any algorithm of the suite, ``SurgeryError`` for a
surgery's settings and the models it cannot rewrite."""


class AlgorithmError(ValueError):
    """Bad settings or input of one of the suite's algorithms: one line, naming the algorithm (``.algorithm``) and the
    argument or module. Nothing has been changed when it is raised. (A ``ValueError``, so callers that caught those
    before keep working.)"""

    def __init__(self, algorithm: str, message: str):
        super().__init__(f"{algorithm}: {message}")
        self.algorithm = algorithm


class SurgeryError(AlgorithmError):
    """Bad settings or a model the surgery cannot rewrite."""


class NothingToRewrite(SurgeryError):
    """Raised by ``Surgery.check_model``: the model holds nothing this surgery can rewrite, for a reason the user
    should hear (e.g. the model *is* the block, and the root cannot be replaced). The core turns it into Composer's
    ``NoEffectWarning`` and leaves the model unchanged, or raises it with ``strict=True``."""
