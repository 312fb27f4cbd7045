"""The engine's typed errors: what the API maps to HTTP statuses, never by message text."""


class EngineError(Exception):
    """Base of the errors the engine raises at its callers."""


class InvalidParameter(EngineError):
    """A request field is out of range or does not fit the model; `param` names the field.

    `requirement` (when the message is "<param> <requirement>") lets a caller that
    knows the field under another name say it in its own words.
    """

    def __init__(self, param: str, message: str, requirement: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.message = message
        self.requirement = requirement

    @classmethod
    def must(cls, param: str, requirement: str) -> "InvalidParameter":
        """The error "<param> <requirement>", e.g. must("top_p", "must be in (0, 1]")."""
        return cls(param, f"{param} {requirement}", requirement)

    def renamed(self, names: dict[str, str]) -> "InvalidParameter":
        """The same error for a caller whose field `param` is called `names[param]`."""
        name = names.get(self.param)
        if name is None:
            return self
        if self.requirement is None:
            return InvalidParameter(name, self.message)
        return InvalidParameter.must(name, self.requirement)


class EngineDeadError(EngineError):
    """The engine thread is not running (shut down, or died of a fault)."""


class EngineSleepingError(EngineError):
    """A request reached an engine that is asleep."""


class EngineBusyError(EngineError):
    """The engine cannot do this while requests are in flight (sleep)."""


class RequestFailedError(EngineError):
    """An internal fault of the engine ended this request; the cause is chained."""
