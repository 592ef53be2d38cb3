"""Register the slash commands with Discord only when they changed.

Discord limits how many commands an application may create per day; syncing at every start is how bots get locked
out (aiyabot#185). The payload Discord would receive is hashed and the hash kept in a small JSON file in the state
folder, one entry per application and scope (global, or the development guild).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import discord
from discord import app_commands

log = logging.getLogger(__name__)

STATE_FILE = "discord-commands.json"


def command_payload(tree: app_commands.CommandTree, guild: discord.abc.Snowflake | None = None) -> list[dict[str, Any]]:
    """Exactly what `tree.sync(guild=...)` sends (no translator is used)."""
    return [command.to_dict(tree) for command in tree._get_all_commands(guild=guild)]  # DEP-WARN: private in 2.7


def payload_hash(payload: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class SyncState:
    """The hashes of what was last synced, in `<state_dir>/discord-commands.json`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s (%s); the commands will be synced again", self.path, exc)
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def get(self, key: str) -> str | None:
        return self._read().get(key)

    def put(self, key: str, value: str) -> None:
        data = self._read()
        data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        temporary.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(temporary, self.path)


async def sync_if_changed(tree: app_commands.CommandTree, state: SyncState, *, application_id: int,
                          guild_id: int | None = None) -> bool:
    """Sync the tree globally (or to `guild_id`, with the global commands copied there) if its payload changed.

    Returns True when Discord was called. A failed sync is logged, not raised: the commands registered before keep
    working, and the next start tries again (no hash is stored).
    """
    guild = discord.Object(guild_id) if guild_id is not None else None
    if guild is not None:
        tree.copy_global_to(guild=guild)
    key = f"{application_id}/" + ("global" if guild_id is None else f"guild/{guild_id}")
    digest = payload_hash(command_payload(tree, guild))
    if state.get(key) == digest:
        log.info("slash commands unchanged (%s); not syncing", key)
        return False
    try:
        synced = await tree.sync(guild=guild)
    except discord.HTTPException as exc:
        log.error("could not register the slash commands (%s): HTTP %s %s; keeping the ones registered before",
                  key, exc.status, exc.text)
        return True
    state.put(key, digest)
    log.info("registered %d slash commands (%s)", len(synced), key)
    return True
