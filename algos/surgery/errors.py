"""The core's one error type for bad settings and models a surgery cannot rewrite."""


class SurgeryError(ValueError):
    """Bad settings or a model the surgery cannot rewrite: one line, naming the algorithm (``.algorithm``) and the
    argument or module. Nothing has been changed when it is raised. (A ``ValueError``, so callers that caught those
    before keep working.)"""

    def __init__(self, algorithm: str, message: str):
        super().__init__(f"{algorithm}: {message}")
        self.algorithm = algorithm
