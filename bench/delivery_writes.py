"""What exactly-once delivery costs the card: bytes written and flushes per MQTT request (issue 12.3).

    .venv/bin/python -m bench.delivery_writes --requests 100

Serves a tiny test model on a mosquitto with persistence, sends requests one at a time (4 tokens each, not
streamed: a streamed answer adds broker work per chunk) and counts, for the appliance and for mosquitto: bytes
written (``write_bytes`` of /proc/<pid>/io: the kernel counts a whole 4 KiB page each time a write dirties one, so an
append flushed at once costs a page, as on the card)
and the fsync/fdatasync calls (strace). Four runs: the delivery journal on and off, and mosquitto saving every
5 minutes (the image) or on every change (``autosave_on_changes true``, ``autosave_interval 1``). The appliance's
log goes to a file in every run, so the journal's cost is the difference between the runs with it and without.
``--dir`` on a file system of its own (a loop device: ``--block-device loop0``) also counts what reached the
device, the file system's journal included (/sys/block/<dev>/stat). Not in CI; the figures are in
docs/operations.md.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from appliance.transports.broker import Mosquitto, free_port
from tests.support import tiny_models
from tests.support.harness import MqttClient, new_appliance

SAVE_EVERY_5_MINUTES = "autosave_interval 300"
SAVE_ON_EVERY_CHANGE = "autosave_on_changes true\nautosave_interval 1"


def written_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"no write_bytes for {pid}")


def device_bytes(device: str | None) -> int:
    """Bytes written to a block device so far (sectors of 512 bytes, /sys/block/<dev>/stat field 7)."""
    return int(Path(f"/sys/block/{device}/stat").read_text().split()[6]) * 512 if device else 0


def count_flushes(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """strace every thread of ``pid`` (paho's network thread writes the journal) and those it starts."""
    threads = [arg for tid in sorted(os.listdir(f"/proc/{pid}/task")) for arg in ("-p", tid)]
    return subprocess.Popen(["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", str(out), *threads],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def flushes(summary: Path) -> int:
    calls = 0
    for line in summary.read_text().splitlines():
        fields = line.split()
        if fields and fields[-1] in ("fsync", "fdatasync"):
            calls += int(fields[3])  # % time, seconds, usecs/call, calls, [errors,] syscall
    return calls


def measure(workdir: Path, catalog: Path, requests: int, *, journal: bool, broker_save: str,
            block_device: str | None) -> dict[str, float]:
    # appended after the generated config's `autosave_interval 60`: mosquitto takes the last value
    broker = Mosquitto(workdir / "broker", free_port(), persistence=True, extra=broker_save)
    broker.start()
    app = new_appliance(workdir, broker.port, catalog, "tiny", {"mqtt": {"journal": journal}})
    try:
        app.start()
        client = MqttClient(broker.host, broker.port)
        for n in range(3):  # warm-up: model loaded, sessions and retained status saved
            client.request(app.topic("generate"), {"id": f"w{n}", "prompt": "warm up", "max_tokens": 4})
        time.sleep(1.5)
        assert app.proc is not None and broker._process is not None
        pids = {"appliance": app.proc.pid, "mosquitto": broker._process.pid}
        tracers = {name: count_flushes(pid, workdir / f"{name}.strace") for name, pid in pids.items()}
        time.sleep(1.0)  # strace attached
        os.sync()
        before = {name: written_bytes(pid) for name, pid in pids.items()}
        device_before = device_bytes(block_device)
        for n in range(requests):
            reply = client.request(app.topic("generate"), {"id": f"r{n}", "prompt": f"q{n}", "max_tokens": 4})
            assert reply[-1]["type"] == "result", reply
        time.sleep(1.5)  # the last acks and saves
        after = {name: written_bytes(pid) for name, pid in pids.items()}
        os.sync()  # what the kernel still holds reaches the device and is counted
        device_after = device_bytes(block_device)
        for tracer in tracers.values():
            tracer.send_signal(signal.SIGINT)
            tracer.wait(10)
        client.close()
        result: dict[str, float] = {}
        for name in pids:
            result[f"{name} bytes"] = (after[name] - before[name]) / requests
            result[f"{name} fsyncs"] = flushes(workdir / f"{name}.strace") / requests
        if block_device:
            result["device bytes"] = (device_after - device_before) / requests
        return result
    finally:
        app.kill()
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--dir", type=Path, default=Path.cwd(), help="where the broker and the appliance write")
    parser.add_argument("--block-device", help="the device --dir is on alone, e.g. loop0: its writes are counted")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".delivery-writes-") as tmp:
        root = Path(tmp)
        f32 = tiny_models.write_llama(root / "tiny-f32.gguf")
        q4 = tiny_models.quantize(f32, root / "tiny-q4_0.gguf", "q4_0")
        catalog = root / "catalog.toml"
        catalog.write_text(tiny_models.catalog_entry("tiny", q4, template="chatml"))
        print(f"per request, {args.requests} requests one at a time (4 tokens, not streamed)")
        for broker_name, broker_save in (("every 5 min", SAVE_EVERY_5_MINUTES),
                                         ("every change", SAVE_ON_EVERY_CHANGE)):
            for journal in (False, True):
                run = root / re.sub(r"\W+", "-", f"{broker_name}-{journal}")
                run.mkdir()
                figures = measure(run, catalog, args.requests, journal=journal, broker_save=broker_save,
                                  block_device=args.block_device)
                print(f"mosquitto saves {broker_name:12} journal {'on ' if journal else 'off'}: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    main()
