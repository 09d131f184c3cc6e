"""One error type for bad user input.

Every mistake a user can make (missing file, wrong column, unknown key, batch sizes that
don't divide, ...) raises `UserError` with a message that names the thing and the fix.
The CLI prints it in one line and exits with code 2; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Bad input from the user. `fix` says what to do about it."""

    exit_code = 2

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.fix}" if self.fix else self.message
