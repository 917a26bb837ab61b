"""Painting latency: from a stroke sent by the page to the first frame made with it, through `smd paint`'s server.

The app runs as `smd paint` runs it (the stream on its own thread, uvicorn on a local port) on a
blank canvas with 3 brushes; a client connects over the WebSocket as the page does, presses play,
lets the stream run, then sends strokes one at a time. For each it measures the milliseconds until
the first frame made after the stroke reached the stream (the frame message carries the painting
version it was made with) and how many frames came out in between, which were already in the
UNet when the stroke arrived. `--size cpu` paints 256 x 256 on the tiny model, `full` 512 x 512.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

from benchmarks.common import base_parser, finish_args, model_summary, record, scratch_dir, tiny_taesd

SIZES = {"cpu": 256, "full": 512}
BRUSHES = ("summer mountains", "a giant waterfall", "a large tree")
WARM_FRAMES = 5
STROKES = 10


async def measure(url: str, size: int, strokes: int) -> tuple[list[float], list[int], list[float]]:
    """Milliseconds and frames from each stroke to the first frame made with it, and frame intervals."""
    import websockets

    async with websockets.connect(url) as ws:
        version, frames, intervals, last = 0, 0, [], None
        latencies: list[float] = []
        counts: list[int] = []

        async def next_message() -> dict | None:
            nonlocal version, frames, last
            message = await ws.recv()
            if isinstance(message, bytes):
                return None
            m = json.loads(message)
            if m["type"] == "state":
                version = max(version, m["version"])
            elif m["type"] == "shown":
                now = time.perf_counter()
                if last is not None:
                    intervals.append(now - last)
                last, frames = now, m["frames"]
            return m

        for i, prompt in enumerate(BRUSHES):
            if i:
                await ws.send(json.dumps({"op": "add_brush"}))
            await ws.send(json.dumps({"op": "update_brush", "brush": i, "fields": {"prompt": prompt}}))
        await ws.send(json.dumps({"op": "play"}))  # the stream waits for play, as in the original app
        while frames < WARM_FRAMES:
            await next_message()
        for k in range(strokes):
            y = size * (k + 1) / (strokes + 2)
            sent, before = time.perf_counter(), frames
            await ws.send(json.dumps({"op": "stroke", "brush": k % len(BRUSHES), "points": [[0.1 * size, y],
                                      [0.9 * size, y]], "size": size / 10}))
            wanted = None
            while True:
                m = await next_message()
                if m and m["type"] == "state" and wanted is None:
                    wanted = m["version"]
                if m and m["type"] == "shown" and wanted is not None and m["version"] >= wanted:
                    latencies.append(1000 * (time.perf_counter() - sent))
                    counts.append(m["frames"] - before - 1)
                    break
        return latencies, counts, intervals


def main(argv=None) -> str:
    from smd_cli.app.painting import Painting
    from smd_cli.app.web.paint import PaintSession, Server, listen
    from smd_cli.engine.pipeline import StableMultiDiffusionPipeline

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--vae", default=None, help="AutoencoderTiny folder (default: a tiny random one)")
    parser.add_argument("--strokes", type=int, default=STROKES)
    args = finish_args(parser.parse_args(argv))
    size = SIZES[args.size]
    vae = args.vae or str(tiny_taesd(scratch_dir() / "taesd"))
    pipe = StableMultiDiffusionPipeline(args.device, hf_key=args.model, vae=vae, dtype=args.dtype, lcm_lora="none")
    session = PaintSession(Painting.blank(size, size), pipe, save_dir=scratch_dir(), stem="painting").start()
    server = Server(session, listen("127.0.0.1", 0)).start()
    try:
        latencies, counts, intervals = asyncio.run(measure(server.url.replace("http", "ws") + "ws", size, args.strokes))
    finally:
        server.stop()
        session.close()
    frame_ms = 1000 * statistics.median(intervals)
    rows = [{"measure": "stroke to first frame made with it, ms", "median": f"{statistics.median(latencies):.0f}",
             "min": f"{min(latencies):.0f}", "max": f"{max(latencies):.0f}"},
            {"measure": "frames out in between (already in the UNet)", "median": f"{statistics.median(counts):.0f}",
             "min": str(min(counts)), "max": str(max(counts))},
            {"measure": "frame interval, ms", "median": f"{frame_ms:.0f}", "min": f"{1000 * min(intervals):.0f}",
             "max": f"{1000 * max(intervals):.0f}"}]
    notes = [f"{size}x{size}, 3 brushes over the background, {len(session.stream.schedule)} stages, "
             f"{args.strokes} strokes, {args.dtype}; {model_summary(args.model)}; tiny VAE",
             "through the real server: the client is a WebSocket on 127.0.0.1, the stream runs on its own thread"]
    return record(args, "paint", f"Paint ({args.size}): stroke-to-frame latency of smd paint", rows, notes,
                  canvas=f"{size}x{size}")


if __name__ == "__main__":
    main()
