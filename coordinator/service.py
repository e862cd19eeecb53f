"""gRPC servicers: parse, admit, hand off. The logic lives in Coordinator and RoundEngine.

Requests arrive as raw bytes and are parsed here, so a message that is not valid protobuf gets a
precise INVALID_ARGUMENT (gRPC's own deserializer would answer a vague INTERNAL). Every call of a
participant passes admission first (coordinator.admission); every refusal is logged and recorded
in the store before the status goes back.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
import queue
import threading
import time
from typing import Callable, Iterator

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from coordinator import messages
from coordinator.admission import Admission, check_fields, check_version, cut_short
from coordinator.audit_trail import CountersignatureError
from coordinator.auth import Authenticator
from coordinator.coordinator import Coordinator
from coordinator.errors import Code, Refusal, wire_refusal
from coordinator.hosting import HostingError
from coordinator.limits import RecordBudget, StreamWatchdog
from coordinator.metrics import Traffic
from coordinator.spool import SPOOL_DIR, SpoolDir, return_freed_buffers_to_the_os
from coordinator.store import UploadRecord
from kt_core import codec
from kt_core.bounded import escape_field
from kt_core.config import ConfigError, load_toml
from kt_core.wire import chunks, convert
from kt_core.wire import federation_pb2 as pb

log = logging.getLogger(__name__)

# What the coordinator puts in one message of a download: a message is held by gRPC (twice) until
# it is written, once per download in flight, so downloads use smaller messages than the largest
# chunk a site may upload; 1 MiB still keeps per-message costs negligible.
SEND_CHUNK_BYTES = 1 << 20

HEARTBEAT_S = 5.0
# how often an open assignment stream re-checks its certificate: a revocation ends it within this
RECHECK_S = 1.0
# what of a refusal is logged, recorded and sent back (peer names and reasons are peer-chosen text)
MAX_REFUSAL_PEER = 128
MAX_REFUSAL_REASON = 1000
# how long a request stream that ended empty waits to learn whether gRPC cancelled it (_parsed)
ENDED_WAIT_S = 0.2


class ParticipantServicer:
    def __init__(self, coordinator: Coordinator, auth: Authenticator, traffic: Traffic | None = None):
        self.coordinator = coordinator
        self.auth = auth
        self.traffic = traffic or Traffic()
        # uploads are received into files here (and leftovers of an earlier process removed)
        self.spool = SpoolDir(coordinator.store.root / SPOOL_DIR)
        return_freed_buffers_to_the_os()   # transient chunk buffers must not pile up in malloc's arenas
        self.admission = Admission(coordinator, auth)
        self.limits = self.admission.limits

    def admit(self, context) -> None:
        """Identity, revocation, membership and allowance, before the request is parsed."""
        self.admission.identify(context, "participant")

    def _caller(self, context, header: pb.Header) -> str:
        return self.admission.participant(context, header)

    def Join(self, request: pb.JoinRequest, context) -> pb.JoinReply:
        site_id = self._caller(context, request.header)
        engine = self.admission.join(site_id, request.header.run_id)
        engine.sessions.refuse_duplicate(site_id)
        manifest = self.coordinator.manifest
        reply = pb.JoinReply(header=convert.header(engine.run_id, engine.rounds_completed, site_id),
                             run_config_json=engine.config.to_json(), manifest_digest=manifest.digest(),
                             max_chunk_bytes=engine.fed.max_chunk_bytes)
        if self.coordinator.backbone is not None:
            reply.backbone_sha256 = self.coordinator.backbone.sha256
            reply.backbone_bytes = self.coordinator.backbone.size
        for e in manifest.entries:
            reply.manifest.add(name=e.name, role=convert.ROLE_TO_PB[e.role.value], dtype=e.dtype, shape=e.shape)
        engine.sessions.note_capabilities(site_id, request.capabilities)
        caps = request.capabilities
        log.info("%s joined run %s (%s, %d cpus%s)", site_id, engine.run_id, escape_field(caps.software_version or "?"),
                 caps.cpu_count, escape_field("".join(f", {a}" for a in caps.accelerators), 1000))
        return reply

    def Assignments(self, request: pb.AssignmentStreamRequest, context) -> Iterator[pb.Assignment]:
        site_id = self._caller(context, request.header)
        engine = self.coordinator.engine_for(request.header.run_id)
        session = engine.sessions.connect(site_id, alive=context.is_active)
        context.add_callback(lambda: engine.sessions.disconnect(session))
        quiet_since = time.monotonic()
        while context.is_active():
            try:
                assignment = session.queue.get(timeout=RECHECK_S)
            except queue.Empty:
                self.admission.still_valid(context)   # a revoked site's stream ends here
                if time.monotonic() - quiet_since >= HEARTBEAT_S:
                    quiet_since = time.monotonic()
                    yield messages.heartbeat()
                continue
            if assignment is None:
                return
            self.admission.still_valid(context)       # never push an assignment to a revoked site
            yield assignment
            if messages.is_finished(assignment):
                return

    def DownloadState(self, request: pb.StateRequest, context) -> Iterator[pb.StateChunk]:
        site_id = self._caller(context, request.header)
        engine = self.coordinator.engine_for(request.header.run_id)
        # an empty digest asks for the current global state: after RunFinished (which names no
        # digest) a site fetches the run's final state this way; the reply's header names it
        digest = request.global_state_digest or engine.global_digest
        # streamed from the state file by offsets; the digests were computed when it was written
        state = engine.state_for(digest)
        engine.sessions.note_state_sent(site_id, request.header.round, digest, state.specs)
        yield pb.StateChunk(header=pb.StateHeader(
            header=convert.header(engine.run_id, engine.rounds_completed, site_id),
            global_state_digest=digest,
            tensors=[convert.spec_to_pb(spec) for spec in state.specs]))
        for name, offset, data in state.chunks(min(engine.fed.max_chunk_bytes, SEND_CHUNK_BYTES)):
            # already serialized (kt_core.wire.chunks): gRPC sends these bytes, with no message copy
            message = chunks.encode_chunk_message(name, offset, data)
            sent = len(data)
            del data
            yield message
            del message     # before the next chunk is read: one chunk per download in Python
            self.traffic.sent(sent)
        self.traffic.download_done()

    def Upload(self, request_iterator: Iterator[pb.UploadChunk], context) -> pb.UploadReceipt:
        first = next(request_iterator, None)
        if first is None or isinstance(first, chunks.ChunkView):
            raise Refusal(Code.INVALID_ARGUMENT, "an upload must start with an UploadHeader")
        head = first.header
        site_id = self._caller(context, head.header)
        engine = self.coordinator.engine_for(head.header.run_id)
        attempt = engine.answers.check_upload(site_id, head)
        fed = engine.fed
        specs = tuple(convert.spec_from_pb(s) for s in head.tensors)
        digest = codec.state_digest(specs)
        # The chunks go to a spool file as they arrive, checked like the assembler checks them;
        # only a verified upload is folded into the aggregate, read back from disk block by block.
        with self.limits.upload_slot(fed):
            try:
                with self.spool.open(specs, max_chunk_bytes=fed.max_chunk_bytes) as spool:
                    for chunk in request_iterator:
                        if not isinstance(chunk, chunks.ChunkView):
                            raise Refusal(Code.INVALID_ARGUMENT, "a second UploadHeader inside one upload")
                        spool.add(chunk.name, chunk.offset, chunk.data)
                        del chunk     # the received bytes go before the next chunk arrives
                    update = spool.finish()
                    self.traffic.received(spool.bytes_received)
                    record = UploadRecord(site_id, head.attempt_id.hex(), head.num_samples, specs, spool.bytes_received,
                                          digest)
                    engine.answers.submit(attempt, record, update, dict(head.metrics), head.audit_countersignature)
            except codec.WireError as err:
                raise wire_refusal(err) from None
            except OSError as err:
                log.error("upload from %s could not be buffered: %s", site_id, err)
                raise Refusal(Code.RESOURCE_EXHAUSTED,
                              f"the coordinator could not buffer the upload on disk: {err}") from None
        return pb.UploadReceipt(header=convert.header(engine.run_id, attempt.round, site_id),
                                bytes_received=record.bytes, update_digest=digest)

    def Decline(self, request: pb.DeclineRequest, context) -> pb.DeclineReply:
        site_id = self._caller(context, request.header)
        engine = self.coordinator.engine_for(request.header.run_id)
        attempt = engine.answers.decline(site_id, messages.decline_answer(request))
        return pb.DeclineReply(header=convert.header(engine.run_id, attempt.round, site_id))

    def SubmitSecAgg(self, request_iterator: Iterator[pb.SecAggSubmission], context) -> pb.SecAggReceipt:
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise Refusal(Code.INVALID_ARGUMENT, "a SecAgg submission must start with its header")
        site_id = self._caller(context, first.header)
        engine = self.coordinator.engine_for(first.header.run_id)
        step = convert.SECAGG_STEP_FROM_PB.get(first.step)
        if step is None:
            raise Refusal(Code.INVALID_ARGUMENT, f"unknown secure aggregation step {first.step}")
        attempt = engine.secagg.check(site_id, first.header.round, first.attempt_id, step, first.payload_bytes)
        # The declared size was checked against the step's bound: that much is allocated once and
        # filled in place, and no more is read (a masked vector is as large as the update).
        payload, size = bytearray(first.payload_bytes), 0
        for message in itertools.chain([first], request_iterator):
            if message is not first and message.HasField("header"):
                raise Refusal(Code.INVALID_ARGUMENT, "a second header inside one SecAgg submission")
            part = message.payload_part
            del message
            if size + len(part) > first.payload_bytes:
                raise Refusal(Code.RESOURCE_EXHAUSTED,
                              f"{step}: payload exceeds its declared {first.payload_bytes} bytes")
            payload[size:size + len(part)] = part
            size += len(part)
            del part
        if size != first.payload_bytes:
            raise Refusal(Code.INVALID_ARGUMENT,
                          f"{step}: payload holds {size} bytes, {first.payload_bytes} declared")
        self.traffic.received(size)
        engine.secagg.submit(attempt, site_id, step, payload, dict(first.metrics), first.audit_countersignature)
        return pb.SecAggReceipt(header=convert.header(engine.run_id, attempt.round, site_id), bytes_received=size)

    def DownloadBackbone(self, request: pb.BackboneRequest, context) -> Iterator[pb.BackboneChunk]:
        site_id = self._caller(context, request.header)
        engine = self.coordinator.engine_for(request.header.run_id)
        hosted = self.coordinator.backbone
        if hosted is None:
            raise Refusal(Code.FAILED_PRECONDITION, f"run {engine.run_id} hosts no backbone")
        if request.sha256 != hosted.sha256:
            raise Refusal(Code.NOT_FOUND,
                          f"backbone {request.sha256[:16]}… is not the run's ({hosted.sha256[:16]}…)")
        try:
            for offset, data in hosted.chunks(request.offset, min(engine.fed.max_chunk_bytes, SEND_CHUNK_BYTES)):
                yield pb.BackboneChunk(offset=offset, data=data)
                self.traffic.sent(len(data))
        except HostingError as err:
            raise Refusal(Code.DATA_LOSS, str(err)) from None
        # logged once the whole checkpoint went out (the site logs its receipt once it checked it)
        engine.trail.sent(engine.run_id, request.header.round, site_id, "backbone", hosted.sha256, nbytes=hosted.size,
                          awaits_answer=False)
        log.info("%s downloaded the backbone (%d bytes from offset %d)", site_id, hosted.size, request.offset)

    def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveReply:
        site_id = self._caller(context, request.header)
        log.info("%s left: %s", site_id, escape_field(request.reason or "no reason given"))
        if request.audit_countersignature:
            engine = self.coordinator.engine_for(request.header.run_id)
            try:
                engine.trail.seal_countersigned(site_id, request.audit_countersignature, engine.sessions.certificate(site_id))
            except CountersignatureError as err:   # the audit log has recorded it as a refusal
                raise Refusal(Code.INVALID_ARGUMENT, f"audit countersignature refused: {err}") from None
        return pb.LeaveReply()


class OperatorServicer:
    def __init__(self, coordinator: Coordinator, auth: Authenticator, admission: Admission | None = None):
        self.coordinator = coordinator
        self.auth = auth
        # shared with the participant service's: the allowance is per certificate
        self.admission = admission or Admission(coordinator, auth)

    def admit(self, context) -> None:
        self.admission.identify(context, "operator")

    def StartRun(self, request: pb.StartRunRequest, context) -> pb.RunStatus:
        caller = self.auth.caller(context, "operator")
        check_version(request.header)
        try:
            config = load_toml(request.run_config_toml, "run config")
        except ConfigError as err:
            raise Refusal(Code.INVALID_ARGUMENT, str(err)) from None
        run_id = self.coordinator.start_run(config)
        log.info("operator %s started run %s", caller.name, run_id)
        return self.coordinator.current().status()

    def GetRunStatus(self, request: pb.RunStatusRequest, context) -> pb.RunStatus:
        self.auth.caller(context, "operator")
        check_version(request.header)
        if request.header.run_id:
            return self.coordinator.engine_for(request.header.run_id).status()
        return self.coordinator.current().status()

    def StopRun(self, request: pb.StopRunRequest, context) -> pb.RunStatus:
        caller = self.auth.caller(context, "operator")
        check_version(request.header)
        engine = self.coordinator.engine_for(request.header.run_id)
        log.info("operator %s stops run %s: %s", caller.name, engine.run_id, escape_field(request.reason))
        self.coordinator.stop("stopped")
        return engine.status()


# -- handler plumbing ---------------------------------------------------------------------------

def _peer_name(context) -> str:
    try:
        names = context.auth_context().get("x509_common_name")
    except Exception:  # noqa: BLE001 - a broken context must not hide the original refusal
        names = None
    return names[0].decode(errors="replace") if names else context.peer()


def _refusing(method: str, record: Callable[[str, str, str, str], None], fn, budget: RecordBudget):
    """Turn a Refusal into a logged, recorded gRPC status; works for unary and streaming responses.
    What is logged, recorded and answered is cut and escaped (a peer chose parts of it), and a
    peer's refusals past its record budget are counted into its next recorded one."""

    def refuse(err: Refusal, context):
        peer = escape_field(_peer_name(context), MAX_REFUSAL_PEER)
        reason = escape_field(str(err), MAX_REFUSAL_REASON)
        held = budget.take(peer)
        if held is not None:
            more = f" (and {held} more refusals of {peer} before this one, not recorded one by one)" if held else ""
            log.warning("refused %s from %s: %s %s%s", method, peer, err.code.name, reason, more)
            record(peer, method, err.code.name, reason + more)
        context.abort(err.code, reason)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(request, context):
            try:
                yield from fn(request, context)
            except Refusal as err:
                refuse(err, context)
        return stream

    @functools.wraps(fn)
    def unary(request, context):
        try:
            return fn(request, context)
        except Refusal as err:
            refuse(err, context)
    return unary


def _parser(method: str, cls):
    def parse(raw: bytes):
        message = cls()
        try:
            message.ParseFromString(raw)
        except DecodeError as err:
            raise Refusal(Code.INVALID_ARGUMENT,
                          f"{method}: request is not a valid {cls.DESCRIPTOR.full_name}: {err}") from None
        check_fields(message)
        return message
    return parse


def _upload_parser(method: str, cls):
    """Upload's messages: a chunk as a view into the received bytes (kt_core.wire.chunks), even
    when it had to go through the generated parser; a header as the generated message."""
    parse = _parser(method, cls)

    def parse_upload(raw: bytes):
        view = chunks.parse_chunk_message(raw)
        if view is not None:
            return view
        message = parse(raw)
        if message.HasField("chunk"):
            c = message.chunk
            return chunks.ChunkView(c.name, c.offset, memoryview(c.data))
        return message
    return parse_upload


def _parsed(request_iterator, parse, context, watch=None, stopping=lambda: False):
    """The stream's messages, parsed, holding none while the next one is awaited: a chunk lives
    only as long as the servicer keeps it (a `for raw in ...` loop would keep the last one).
    `watch` (a limits.Watch) ends the call when the next message is too long in coming. A stream
    that gRPC ended before a message reached us becomes a Refusal (admission.cut_short)."""
    received = 0
    while True:
        try:
            raw = next(request_iterator, None)
        except grpc.RpcError:
            refusal = cut_short(context, watch, received, stopping)
            if refusal is None:
                raise
            raise refusal from None
        if raw is None:
            # gRPC reports its own end of a call as an end of stream and a cancellation, two
            # events: a stream that ends before its first message waits a moment for the second
            # (a later message's end, if it came alone, meets the servicer's own checks)
            if (_ended_meanwhile(context) if received == 0 else not context.is_active()):
                refusal = cut_short(context, watch, received, stopping)
                if refusal is None:
                    context.abort(Code.CANCELLED, "the call ended before its request arrived")
                raise refusal
            return
        received += 1
        if watch is not None:
            watch.touch()
        message = parse(raw)
        del raw
        yield message
        del message


@contextlib.contextmanager
def _watching(watchdog: StreamWatchdog | None, context):
    """The watchdog's Watch over one call while its request is read (None without a watchdog)."""
    watch = watchdog.watch(context) if watchdog is not None else None
    try:
        yield watch
    finally:
        if watch is not None:
            watch.done()


def _ended_meanwhile(context, wait_s: float = ENDED_WAIT_S) -> bool:
    ended = threading.Event()
    if context.add_callback(ended.set):   # False: the call has ended already
        ended.wait(wait_s)
    return not context.is_active()


def _only(messages, method: str):
    """The one message of a unary request (on the wire, a stream of exactly one message)."""
    message = next(messages, None)
    if message is None:
        raise Refusal(Code.UNIMPLEMENTED, f"{method} requires exactly one request message")
    return message


def _serialize(response_cls):
    """Responses the servicer serialized itself (bulk chunks) pass through as they are."""
    def serialize(message) -> bytes:
        return message if type(message) is bytes else response_cls.SerializeToString(message)
    return serialize


def generic_handler(service_name: str, servicer, record, watchdog: StreamWatchdog | None = None, *,
                    streamed: bool = False, stopping: Callable[[], bool] = lambda: False) -> grpc.GenericRpcHandler:
    """The service's methods: admission before the request is read, parsing with bounds, the
    servicer, refusals logged and recorded; client streams watched by `watchdog` when given.
    `service_name`: one of the wire contract's services (ParticipantService, OperatorService),
    or the full name of another service the process knows (grpc.health.v1.Health).

    `streamed` (the server's): every method takes its request as a stream, a unary one included
    (on the wire a unary request is a stream of one message, so clients see no difference).
    gRPC then hands the call to us before the message arrives: admission runs first, the
    watchdog bounds the wait for the message, and a message gRPC refuses (over the size limit)
    is seen here, where the caller's identity is known, and recorded like every other refusal.
    `stopping` says when the server is shutting down (the calls it ends are nobody's refusal)."""
    service = pb.DESCRIPTOR.services_by_name.get(service_name) or descriptor_pool.Default().FindServiceByName(
        service_name)
    admit = getattr(servicer, "admit", lambda context: None)
    budget = RecordBudget()
    handlers = {}
    for method in service.methods:
        request_cls = _message_class(method.input_type)
        response_cls = _message_class(method.output_type)
        parse = (_upload_parser if request_cls is pb.UploadChunk else _parser)(method.name, request_cls)
        fn = getattr(servicer, method.name)
        name = f"{service.name}.{method.name}"
        if method.client_streaming:
            def wrapped(request_iterator, context, fn=fn, parse=parse):
                admit(context)
                with _watching(watchdog, context) as watch:
                    return fn(_parsed(request_iterator, parse, context, watch, stopping), context)
        elif streamed:
            def read(request_iterator, context, parse=parse, name=name):
                admit(context)
                with _watching(watchdog, context) as watch:
                    return _only(_parsed(request_iterator, parse, context, watch, stopping), name)
            if method.server_streaming:
                def wrapped(request_iterator, context, fn=fn, read=read):
                    yield from fn(read(request_iterator, context), context)
            else:
                def wrapped(request_iterator, context, fn=fn, read=read):
                    return fn(read(request_iterator, context), context)
        elif method.server_streaming:
            def wrapped(raw, context, fn=fn, parse=parse):
                admit(context)
                yield from fn(parse(raw), context)
        else:
            def wrapped(raw, context, fn=fn, parse=parse):
                admit(context)
                return fn(parse(raw), context)
        wrapped = _refusing(name, record, wrapped, budget)
        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(method.client_streaming or streamed,
                                                                      method.server_streaming)]
        handlers[method.name] = make(wrapped, request_deserializer=None,
                                     response_serializer=_serialize(response_cls))
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _message_class(descriptor):
    return message_factory.GetMessageClass(descriptor)   # the generated class (pb's, or health_pb2's)

