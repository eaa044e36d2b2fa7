"""Per-matrix status codes written by the batched damped inversion (all backends)."""

from enum import IntEnum


class InverseStatus(IntEnum):
    OK = 0  #: Cholesky of C + lam*I succeeded
    RETRIED = 1  #: first attempt failed; succeeded with lam * retry_damping_factor
    KEPT_PREVIOUS = 2  #: both attempts failed; the previous valid inverse is kept
    SCALED_IDENTITY = 3  #: both attempts failed and no previous inverse: I / lam (I if lam is not finite)

    @staticmethod
    def is_valid(status: int) -> bool:
        """Whether the matrix holds a real (possibly previous) inverse rather than the fallback."""
        return status <= InverseStatus.KEPT_PREVIOUS
