#!/usr/bin/env python3
"""Backends of the soak benchmark: one asyncio process listening on every HOST:PORT given,
echoing each line back. Prints READY once all are bound. Usage: echo.py HOST:PORT..."""
import asyncio
import sys


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def main() -> None:
    servers = []
    for spec in sys.argv[1:]:
        host, port = spec.rsplit(":", 1)
        servers.append(await asyncio.start_server(handle, host, int(port), backlog=512,
                                                  reuse_address=True))
    print("READY", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


asyncio.run(main())
