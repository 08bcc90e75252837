#!/usr/bin/env python3
"""A TCP proxy in front of PostgreSQL's unix socket that delivers every chunk DELAY_MS later,
in both directions: a database on another host, for benchmarks (scripts/bench_rollups).

    python scripts/delay_proxy.py PORT SOCKET_PATH DELAY_MS

Listens on 127.0.0.1:PORT. Chunks keep their order (a constant delay), so the protocol is
unchanged; only every round trip takes 2 x DELAY_MS longer. A BENCHMARK TOOL, not part of
the product (this machine's kernel has no netem to do it with tc).
"""
import asyncio
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    try:
        while data := await reader.read(65536):
            loop.call_later(delay, writer.write, data)
    finally:
        loop.call_later(delay + 0.001, writer.close)


async def _main(port: int, socket_path: str, delay: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(socket_path)
        asyncio.ensure_future(_pipe(reader, up_writer, delay))
        asyncio.ensure_future(_pipe(up_reader, writer, delay))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]) / 1000))
