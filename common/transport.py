"""ZeroMQ plumbing, and the only module that imports ``zmq``: bounded sockets, timeouts, message send/receive.

Topology (bind the stable side, connect the many):

- experience: actors PUSH -> learner PULL. PUSH blocks at its high-water mark, so a slow learner slows actors
  down (bounded memory) instead of anything being dropped.
- weights: learner PUB -> actors SUB. PUB drops for slow or late subscribers, so every snapshot is complete and
  versioned, and an actor that joins or falls behind asks for the current one over control (zguide "Clone").
- control: actors DEALER <-> learner ROUTER: hello/welcome/refuse, weights requests, heartbeats, shutdown.

Every socket closes with linger 0; every wait has a deadline.

Security: with ``transport.keys_dir`` every TCP socket uses ZeroMQ CURVE (encryption and authentication). The
learner is the CURVE server and admits only clients whose public key is one of the ``*.key`` files in that
folder (a ZAP handler in a thread, ``CurveGate``); others are denied, logged and counted. ``make_keys`` writes a
learner and an actor key pair (``python launch.py keys DIR``). Loopback-only runs may go without keys.
"""

from __future__ import annotations

import logging
import socket as pysocket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from common import protocol
from common.logs import RateLimitFilter
from common.protocol import Message

logger = logging.getLogger(__name__)
logger.addFilter(RateLimitFilter())  # what peers send decides how often these fire
CONTROL_MAX_BYTES = 1 << 20
CONTROL_HWM = 256
"""Replies queued per actor on the learner's control socket (8 minutes of heartbeats): a peer that asks for
snapshot chunks and never reads them holds at most this many (then replies to it are dropped)."""
"""The largest frame a learner takes on its control socket (hellos, heartbeats, requests: a few hundred bytes)."""


@dataclass(frozen=True)
class Endpoints:
    """Addresses the learner binds and actors connect to (``tcp://host:port`` or ``inproc://name``)."""

    experience: str
    weights: str
    control: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def inproc(cls) -> Endpoints:
        """Fresh in-process addresses (one-process mode and tests; needs one shared zmq.Context)."""
        tag = uuid.uuid4().hex[:8]
        return cls(f"inproc://experience-{tag}", f"inproc://weights-{tag}", f"inproc://control-{tag}")

    @classmethod
    def tcp(cls, host: str, ports: tuple[int, int, int]) -> Endpoints:
        return cls(*(f"tcp://{host}:{port}" for port in ports))

    @classmethod
    def from_base(cls, address: str) -> Endpoints:
        """``tcp://HOST:PORT`` -> experience at PORT, weights at PORT+1, control at PORT+2."""
        scheme, _, rest = address.partition("://")
        host, _, port = rest.rpartition(":")
        if scheme != "tcp" or not host or not port.isdigit() or not 0 < int(port) < 65534:
            raise ValueError(f"{address!r}: expected tcp://HOST:PORT with PORT below 65534")
        base = int(port)
        return cls.tcp(host, (base, base + 1, base + 2))


def free_tcp_ports(host: str = "127.0.0.1", count: int = 3) -> tuple[int, ...]:
    """``count`` distinct ports that were free on ``host`` a moment ago (the learner binds them next)."""
    sockets = []
    try:
        for _ in range(count):
            s = pysocket.socket(pysocket.AF_INET, pysocket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return tuple(s.getsockname()[1] for s in sockets)
    finally:
        for s in sockets:
            s.close()


def curve_keys(keys_dir: str, role: str) -> CurveKeys | None:
    """The keys of ``role`` ('learner' or 'actor') when the run has a keys folder, else None."""
    return CurveKeys.load(keys_dir, role) if keys_dir else None


def make_keys(folder: str | Path) -> list[Path]:
    """Write a learner and an actor CURVE key pair (``NAME.key`` public, ``NAME.key_secret``) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    written = []
    for name in ("learner", "actor"):
        public, secret = zmq.auth.create_certificates(str(folder), name)
        written += [Path(public), Path(secret)]
    Path(folder, "learner.key_secret").chmod(0o600)
    Path(folder, "actor.key_secret").chmod(0o600)
    return written


@dataclass(frozen=True)
class CurveKeys:
    """One side's CURVE material: its own key pair and the learner's public key (what clients verify)."""

    folder: str
    public: bytes
    secret: bytes
    learner_public: bytes

    @classmethod
    def load(cls, folder: str | Path, role: str) -> CurveKeys:
        """``role``: 'learner' or 'actor'. Raises ValueError naming the missing or unreadable file."""
        folder = Path(folder)
        try:
            public, secret = zmq.auth.load_certificate(str(folder / f"{role}.key_secret"))
            learner_public, _ = zmq.auth.load_certificate(str(folder / "learner.key"))
        except (OSError, ValueError) as e:
            raise ValueError(
                f"cannot load CURVE keys from {folder} ({e}); make them with: python launch.py keys {folder}"
            ) from None
        if secret is None:
            raise ValueError(f"{folder / f'{role}.key_secret'} holds no secret key")
        return cls(str(folder), public, secret, learner_public)


class CurveGate:
    """The learner's ZAP handler: admits clients whose public key is a ``*.key`` file in the keys folder."""

    def __init__(self, ctx: zmq.Context, folder: str):
        self.allowed = {zmq.auth.load_certificate(str(f))[0] for f in Path(folder).glob("*.key")}
        self.denied = 0
        self._lock = threading.Lock()
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=self)

    def callback(self, domain: str, client_key: bytes) -> bool:
        if client_key in self.allowed:
            return True
        with self._lock:
            self.denied += 1
        logger.warning(
            "refused a CURVE client with an unknown public key %s", client_key.decode()[:12] + "..."
        )
        return False

    def stop(self) -> None:
        self._auth.stop()


def _secure(sock: zmq.Socket, keys: CurveKeys | None, server: bool) -> None:
    if keys is None:
        return
    sock.curve_secretkey, sock.curve_publickey = keys.secret, keys.public
    if server:
        sock.curve_server = True
    else:
        sock.curve_serverkey = keys.learner_public


def _socket(ctx: zmq.Context, kind: int, hwm: int, max_bytes: int = 0) -> zmq.Socket:
    """A socket with linger 0 and these high-water marks; ``max_bytes`` > 0 caps every incoming frame (ZeroMQ
    drops the connection of a peer that sends more, before the frame is buffered: over tcp and ipc)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if max_bytes > 0:
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    return sock


def send(
    sock: zmq.Socket, msg: Message, identity: bytes | None = None, timeout_ms: int | None = None
) -> bool:
    """Send ``msg`` (to ``identity`` on a ROUTER); False when it could not be queued within ``timeout_ms``."""
    frames = protocol.encode(msg)
    if identity is not None:
        frames = [identity, *frames]
    if timeout_ms is not None and not sock.poll(timeout_ms, zmq.POLLOUT):
        return False
    try:
        sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return False
    return True


class LearnerSockets:
    """The learner's bound sockets: PULL (experience), PUB (weights), ROUTER (control)."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoints: Endpoints,
        experience_hwm: int = 4,
        keys: CurveKeys | None = None,
        max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
    ):
        self.endpoints = endpoints
        self.gate = CurveGate(ctx, keys.folder) if keys is not None else None
        self.experience = _socket(ctx, zmq.PULL, experience_hwm, max_message_bytes)
        self.weights = _socket(ctx, zmq.PUB, 2)
        # Actors send only small requests over control: 200 MB frames there grew a learner 173 MiB -> 3.1 GiB.
        self.control = _socket(ctx, zmq.ROUTER, CONTROL_HWM, CONTROL_MAX_BYTES)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unknown peer is an error, not a silent drop
        try:
            for sock, address in (
                (self.experience, endpoints.experience),
                (self.weights, endpoints.weights),
                (self.control, endpoints.control),
            ):
                _secure(sock, keys, server=True)
                sock.bind(address)
        except zmq.ZMQError:  # e.g. an address still held: leave nothing half-bound behind
            self.close()
            raise
        self._poller = zmq.Poller()
        self._poller.register(self.control, zmq.POLLIN)
        self._poller.register(self.experience, zmq.POLLIN)
        self._control_only = zmq.Poller()
        self._control_only.register(self.control, zmq.POLLIN)

    def poll(
        self, timeout_ms: int, read_experience: bool = True
    ) -> Iterator[tuple[str, bytes | None, list[bytes]]]:
        """Yield ``(channel, identity, frames)`` of what is ready within ``timeout_ms``, control first.

        With ``read_experience=False`` experience stays queued in ZeroMQ (and actors block): back-pressure.
        """
        poller = self._poller if read_experience else self._control_only
        ready = dict(poller.poll(timeout_ms))
        if self.control in ready:
            while self.control.poll(0):
                identity, *frames = self.control.recv_multipart()
                yield "control", identity, frames
        if read_experience and self.experience in ready:
            yield "experience", None, self.experience.recv_multipart()  # one batch: the caller re-checks room

    def reply(self, identity: bytes, msg: Message) -> bool:
        try:
            return send(self.control, msg, identity=identity, timeout_ms=1000)
        except zmq.ZMQError as e:  # the peer went away (ROUTER_MANDATORY)
            logger.info("cannot reach actor %r: %s", identity, e)
            return False

    def publish(self, msg: Message) -> None:
        send(self.weights, msg, timeout_ms=1000)

    @property
    def denied_peers(self) -> int:
        """Connections refused for an unknown CURVE key (0 without keys)."""
        return 0 if self.gate is None else self.gate.denied

    def close(self, flush_ms: int = 0) -> None:
        """Close the sockets; ``flush_ms`` > 0 gives messages still queued (the shutdown) that long to leave.

        With linger 0 a shutdown sent just before closing can be discarded before it reaches a remote actor
        (CURVE over a real link), leaving the actor waiting for a learner that is gone.
        """
        self.experience.close(linger=0)
        for sock in (self.weights, self.control):
            sock.close(linger=flush_ms)
        if self.gate is not None:
            self.gate.stop()


class ActorSockets:
    """An actor's connected sockets: PUSH (experience), SUB (weights), DEALER (control)."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoints: Endpoints,
        experience_hwm: int = 2,
        keys: CurveKeys | None = None,
        max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
    ):
        self.endpoints = endpoints
        self.experience = _socket(ctx, zmq.PUSH, experience_hwm)
        self.weights = _socket(ctx, zmq.SUB, 2, max_message_bytes)
        self.weights.setsockopt(
            zmq.SUBSCRIBE, b""
        )  # subscribe before asking for the snapshot (Clone pattern)
        self.control = _socket(ctx, zmq.DEALER, 100, max_message_bytes)
        # Queue only to a learner that is connected: nothing piles up for a dead one, to be replayed (stale
        # requests, old-policy experience) to its successor; a send fails and the actor tries again later.
        for sock in (self.experience, self.control):
            sock.setsockopt(zmq.IMMEDIATE, 1)
        for sock, address in (
            (self.experience, endpoints.experience),
            (self.weights, endpoints.weights),
            (self.control, endpoints.control),
        ):
            _secure(sock, keys, server=False)
            sock.connect(address)

    def request(self, msg: Message) -> bool:
        return send(self.control, msg, timeout_ms=1000)

    def receive_control(self, timeout_ms: int) -> list[bytes] | None:
        """Frames of the next control message within ``timeout_ms``, else None."""
        if not self.control.poll(timeout_ms):
            return None
        return self.control.recv_multipart()

    def receive_weights(self) -> list[list[bytes]]:
        """Every weights/shutdown broadcast already queued (non-blocking)."""
        out = []
        while self.weights.poll(0):
            out.append(self.weights.recv_multipart())
        return out

    def send_experience(self, msg: Message, timeout_ms: int) -> bool:
        """Queue an experience batch; False if the learner applied back-pressure for ``timeout_ms``."""
        return send(self.experience, msg, timeout_ms=timeout_ms)

    def close(self) -> None:
        for sock in (self.experience, self.weights, self.control):
            sock.close(linger=0)


@contextmanager
def zmq_context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(
            linger=0
        )  # closes any socket still open (after an error) instead of waiting on it forever
