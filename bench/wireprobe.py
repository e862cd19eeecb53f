"""Transport probe: how fast does a ~4 MB state move over our mTLS gRPC, without any federation logic?

    python -m bench.wireprobe [--mib 4] [--chunk-mib 1] [--clients 1 3] [--insecure]

A server process (separate, like the coordinator) serves DownloadState-like (server streaming) and
Upload-like (client streaming) calls with the real codec/convert path: the download is the
pre-encoded state cut by `convert.tensor_chunks`, the upload goes through `convert.upload_messages`
and `codec.TensorAssembler`. Clients run as separate processes (like participants). Reports per
call wall time and MB/s for 1 and N concurrent clients, and the same with the codec work removed
(raw pre-serialized chunks), which separates our CPU from gRPC/TLS.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import numpy as np

SERVICE = "probe.Probe"


def _state(mib: float) -> dict[str, np.ndarray]:
    n = int(mib * (1 << 20) / 4)
    rng = np.random.default_rng(0)
    return {"w1": rng.standard_normal(n * 3 // 4).astype(np.float32),
            "w2": rng.standard_normal(n - n * 3 // 4).astype(np.float32)}


def _server(pki: str, port_q, mib: float, chunk: int, insecure: bool) -> None:
    import grpc
    from concurrent import futures
    from kt_core import codec
    from kt_core.wire import convert, transport
    from kt_core.wire import federation_pb2 as pb

    encoded = codec.encode(_state(mib))
    raw_chunks = [pb.StateChunk(chunk=c).SerializeToString() for c in convert.tensor_chunks(encoded, chunk)]

    def download(req, ctx):               # the service's path: chunk + serialize per call
        for c in convert.tensor_chunks(encoded, chunk):
            yield pb.StateChunk(chunk=c)

    def download_raw(req, ctx):
        yield from raw_chunks

    def upload(it, ctx):
        first = next(it)
        asm = codec.TensorAssembler([convert.spec_from_pb(t) for t in first.header.tensors], max_chunk_bytes=chunk)
        for m in it:
            asm.add(m.chunk.name, m.chunk.offset, m.chunk.data)
        asm.finish()
        return b""

    def upload_raw(it, ctx):
        for _ in it:
            pass
        return b""

    ident = lambda x: x
    handlers = {
        "Download": grpc.unary_stream_rpc_method_handler(download, ident, lambda m: m.SerializeToString()),
        "DownloadRaw": grpc.unary_stream_rpc_method_handler(download_raw, ident, ident),
        "Upload": grpc.stream_unary_rpc_method_handler(upload, pb.UploadChunk.FromString, ident),
        "UploadRaw": grpc.stream_unary_rpc_method_handler(upload_raw, ident, ident),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=transport.SERVER_OPTIONS)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    if insecure:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", transport.server_credentials(
            transport.TLSFiles.from_pki(pki, "coordinator")))
    server.start()
    port_q.put(port)
    server.wait_for_termination()


def _client(pki: str, site: str, port: int, mib: float, chunk: int, insecure: bool, reps: int, barrier, out_q) -> None:
    from kt_core import codec
    from kt_core.wire import convert, transport
    from kt_core.wire import federation_pb2 as pb

    ch = transport.open_channel(f"127.0.0.1:{port}", None if insecure else transport.TLSFiles.from_pki(pki, site),
                                insecure=insecure)
    ident = lambda x: x
    calls = {
        "Download": ch.unary_stream(f"/{SERVICE}/Download", request_serializer=ident, response_deserializer=pb.StateChunk.FromString),
        "DownloadRaw": ch.unary_stream(f"/{SERVICE}/DownloadRaw", request_serializer=ident, response_deserializer=ident),
        "Upload": ch.stream_unary(f"/{SERVICE}/Upload", request_serializer=lambda m: m.SerializeToString(), response_deserializer=ident),
        "UploadRaw": ch.stream_unary(f"/{SERVICE}/UploadRaw", request_serializer=ident, response_deserializer=ident),
    }
    state = _state(mib)
    encoded = codec.encode(state)
    raw_up = [pb.UploadChunk(chunk=c).SerializeToString() for c in convert.tensor_chunks(encoded, chunk)]
    list(calls["DownloadRaw"](b""))       # warm the connection (handshake)
    res = {}
    for name in ("Download", "DownloadRaw", "Upload", "UploadRaw"):
        ts = []
        for _ in range(reps):
            barrier.wait()
            t0 = time.perf_counter()
            if name == "Download":
                msgs = list(calls[name](b""))
                asm = codec.TensorAssembler([s for s, _ in encoded], max_chunk_bytes=chunk)
                for m in msgs:
                    asm.add(m.chunk.name, m.chunk.offset, m.chunk.data)
                asm.finish()
            elif name == "DownloadRaw":
                list(calls[name](b""))
            elif name == "Upload":
                h = pb.UploadHeader(header=convert.header("run", 1, site), num_samples=1)
                _, msgs = convert.upload_messages(h, state, chunk)
                calls[name](msgs)
            else:
                calls[name](iter(raw_up))
            ts.append(time.perf_counter() - t0)
        res[name] = ts
    out_q.put(res)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=float, default=3.8)
    ap.add_argument("--chunk-mib", type=float, default=1.0)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--insecure", action="store_true")
    a = ap.parse_args(argv)
    from bench.common import PKI
    chunk = int(a.chunk_mib * (1 << 20))
    pki = PKI(max(a.clients))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    srv = ctx.Process(target=_server, args=(str(pki.path), q, a.mib, chunk, a.insecure), daemon=True)
    srv.start()
    port = q.get()
    print(f"{a.mib:.1f} MiB state, {a.chunk_mib:g} MiB chunks, {'plaintext' if a.insecure else 'mTLS'}, "
          f"{os.cpu_count()} CPUs; median ms per call (MB/s per client)")
    try:
        for n in a.clients:
            barrier, out = ctx.Barrier(n), ctx.Queue()
            ps = [ctx.Process(target=_client, args=(str(pki.path), pki.sites[i], port, a.mib, chunk, a.insecure,
                                                    a.reps, barrier, out)) for i in range(n)]
            for p in ps:
                p.start()
            results = [out.get() for _ in ps]
            for p in ps:
                p.join()
            for name in ("Download", "DownloadRaw", "Upload", "UploadRaw"):
                ms = statistics.median(t for r in results for t in r[name][1:]) * 1000
                print(f"  {n} client(s) {name:<12} {ms:7.1f} ms  ({a.mib * 1.048576 / ms * 1000:6.0f} MB/s)")
    finally:
        srv.terminate()
        pki.close()


if __name__ == "__main__":
    main()
