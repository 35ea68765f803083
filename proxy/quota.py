"""What a stage that limits keys tells the rest of the gateway: what is left of a key's limits, for
`GET {base}/usage` and the admin API. The `keylimits` plugin is one; any stage with `left` is."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from proxy.keys import KeySettings


@runtime_checkable
class Quota(Protocol):
    async def left(self, account_id: int, settings: KeySettings) -> dict[str, Any]:
        """Each of the key's limits with what is left of it; counts nothing."""
        ...
