"""What the bot and the workers agree on: key names, the model identity, size tiers, and the scripts that make every
state change atomic. No redis import here (the scripts are plain Lua text, registered by the callers).

Keys (all under `<namespace>:`):

    jobs:p<PROTOCOL>:<model identity>:<tier>   stream, consumer group "workers": one entry per published job
    job:<job id>                               hash: request, state, fencing token, owner; the PNG once drawn
    events                                     stream, consumer group "bot": started / progress / done / failed
    worker:<name>                              a worker's capability, JSON, expiring after three heartbeats
    workers                                    hash name -> capability JSON with the time last seen (known workers)
    bot                                        the bot's model identity and protocol version, JSON
    tokens                                     counter: every take of a job gets a new, never repeated token

A job's token (the "attempt") changes each time a worker takes it. A worker's progress, lease renewals and result are
accepted only while the job's hash still holds its token, so a worker that lost its lease (killed, network gone) and
comes back late cannot deliver a stale duplicate, nor acknowledge the entry that the new owner holds.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from engine.jobs import GenerationRequest

PROTOCOL = 2
"""Raised whenever a key, a field or a script changes meaning; a worker of another version is refused.
2: a failed job's `error` is an engine.jobs.Failure value (the bot words it), no longer a sentence."""

WORKERS_GROUP = "workers"
BOT_GROUP = "bot"
BOT_CONSUMER = "bot"

# Size tiers by pixel count. A job goes to the stream of the smallest tier that holds it; a worker reads the streams
# of every tier up to its largest size, so it never pulls a job it cannot draw.
TIERS = (512 * 512, 768 * 768, 1024 * 1024, 1536 * 1536, 2048 * 2048)

# The DiT file's DiffSynth hash names the model (the bot needs no weights to know it). The tiny model's is computed
# by engine.tiny (which needs torch); tests check this copy against it.
MODEL_HASHES = {"majicflus": "3394f306c4cbf04334b712bf5aaed95f", "tiny": "078079410d050c023d3653657561884a"}


def tier_of(pixels: int) -> int:
    """The smallest tier holding `pixels` (the last tier for anything larger: no worker takes it)."""
    return next((tier for tier in TIERS if pixels <= tier), TIERS[-1] + 1)


def tiers_up_to(max_pixels: int) -> list[int]:
    """The tiers a worker drawing at most `max_pixels` reads (at least the smallest)."""
    return [tier for tier in TIERS if tier <= max_pixels] or [TIERS[0]]


def side(tier: int) -> str:
    """A tier as a square size for people: 1048576 -> "1024x1024"."""
    n = int(math.isqrt(tier))
    return f"{n}x{n}"


@dataclass(frozen=True)
class ModelIdentity:
    model: str
    dit_hash: str
    protocol: int = PROTOCOL

    @property
    def key(self) -> str:
        return f"{self.model}-{self.dit_hash[:12]}"

    def describe(self) -> str:
        return f"model {self.model} (DiT {self.dit_hash[:12]}), protocol {self.protocol}"


def expected_identity(model: str) -> ModelIdentity:
    return ModelIdentity(model, MODEL_HASHES[model])


@dataclass(frozen=True)
class Capability:
    """What a worker announces with every heartbeat."""

    name: str
    model: str
    dit_hash: str
    protocol: int
    max_pixels: int
    vram_budget_gb: float
    device: str
    state: str = "idle"  # idle | drawing
    job: str | None = None
    seen: float = 0.0

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(self.model, self.dit_hash, self.protocol)

    @property
    def largest_tier(self) -> int:
        return max(tiers_up_to(self.max_pixels))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Capability":
        data = json.loads(text)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class Keys:
    def __init__(self, namespace: str):
        self.ns = namespace

    def jobs(self, identity: ModelIdentity, tier: int) -> str:
        return f"{self.ns}:jobs:p{identity.protocol}:{identity.key}:{tier}"

    def job(self, job_id: str) -> str:
        return f"{self.ns}:job:{job_id}"

    @property
    def events(self) -> str:
        return f"{self.ns}:events"

    def worker(self, name: str) -> str:
        return f"{self.ns}:worker:{name}"

    @property
    def worker_pattern(self) -> str:
        return f"{self.ns}:worker:*"

    @property
    def workers(self) -> str:
        return f"{self.ns}:workers"

    @property
    def bot(self) -> str:
        return f"{self.ns}:bot"

    @property
    def tokens(self) -> str:
        return f"{self.ns}:tokens"


def encode_request(request: GenerationRequest) -> str:
    return json.dumps(asdict(request))


def decode_request(text: str | bytes) -> GenerationRequest:
    data = json.loads(text)
    return GenerationRequest(prompt=str(data["prompt"]), seed=int(data["seed"]), steps=int(data["steps"]),
                             width=int(data["width"]), height=int(data["height"]))


def text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


# -- scripts (each runs atomically in Redis) --------------------------------------------------------------------------

PUBLISH = """
-- KEYS: job hash, jobs stream. ARGV: job id, request JSON, group. Idempotent: a job already known is left alone.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[3], '0', 'MKSTREAM')
local id = redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
redis.call('HSET', KEYS[1], 'request', ARGV[2], 'stream', KEYS[2], 'entry', id, 'state', 'queued', 'token', '0')
return 1
"""

TAKE = """
-- KEYS: job hash, token counter, events stream. ARGV: worker name, job id.
-- Returns {token, request JSON}, or {0, state} when the job is finished, cancelled or unknown (drop the entry).
local h = redis.call('HMGET', KEYS[1], 'state', 'request')
if not h[1] then return {0, 'unknown'} end
if h[1] ~= 'queued' and h[1] ~= 'running' then return {0, h[1]} end
local token = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'token', token, 'worker', ARGV[1], 'state', 'running')
redis.call('XADD', KEYS[3], '*', 'kind', 'started', 'job', ARGV[2], 'token', token, 'worker', ARGV[1])
return {token, h[2]}
"""

RENEW = """
-- KEYS: job hash, jobs stream, events stream. ARGV: token, group, worker, entry id, then an event's fields (if any).
-- Renews the lease (resets the entry's idle time). 1 = still ours, 0 = lease lost, -1 = cancelled by the bot.
local h = redis.call('HMGET', KEYS[1], 'token', 'state')
if h[1] ~= ARGV[1] then return 0 end
if h[2] == 'cancelled' then return -1 end
redis.call('XCLAIM', KEYS[2], ARGV[2], ARGV[3], 0, ARGV[4], 'JUSTID')
if #ARGV > 4 then redis.call('XADD', KEYS[3], '*', unpack(ARGV, 5)) end
return 1
"""

FINISH = """
-- KEYS: job hash, jobs stream, events stream. ARGV: token, group, entry id, keep ms, kind, png, then event fields.
-- 1 = result accepted, 0 = lease lost (stale result dropped), -1 = the bot had cancelled it (entry dropped).
local h = redis.call('HMGET', KEYS[1], 'token', 'state')
if h[1] ~= ARGV[1] then return 0 end
redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
redis.call('XDEL', KEYS[2], ARGV[3])
if h[2] == 'cancelled' then return -1 end
redis.call('HSET', KEYS[1], 'state', ARGV[5], 'png', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('XADD', KEYS[3], '*', unpack(ARGV, 7))
return 1
"""

RELEASE = """
-- KEYS: job hash, jobs stream. ARGV: token (or 0 when not taken), group, worker, entry id.
-- Gives a job back at once (a stopping worker): queued again, its entry idle long enough for any worker to claim.
local h = redis.call('HMGET', KEYS[1], 'token', 'state')
if ARGV[1] ~= '0' then
  if h[1] ~= ARGV[1] then return 0 end
  if h[2] == 'running' then redis.call('HSET', KEYS[1], 'state', 'queued') end
end
redis.call('XCLAIM', KEYS[2], ARGV[2], ARGV[3], 0, ARGV[4], 'IDLE', '1000000000', 'JUSTID')
return 1
"""

CANCEL = """
-- KEYS: job hash. ARGV: keep ms. The bot cancels a job: a worker drawing it stops at its next lease renewal.
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'cancelled')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""
