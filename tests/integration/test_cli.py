"""The `appliance` command as a user runs it: a real subprocess each time."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from appliance.transports.broker import free_port
from tests.support.harness import REPO, http_post, run_cli


def appliance_cmd(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli(*args, env=env, timeout=timeout)


def test_config_check_lists_every_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[mqtt]\nport = 70000\nprotocl = "5"\n[worker]\nmax_queue = "lots"\n[nope]\nx = 1\n')
    result = appliance_cmd("config", "check", str(bad))
    assert result.returncode == 2
    for expected in ("mqtt.port = 70000: must be between 1 and 65535",
                     "mqtt.protocl: unknown key (did you mean 'protocol'?)",
                     "worker.max_queue = 'lots': must be an integer, not str",
                     "[nope]: unknown section"):
        assert expected in result.stderr, result.stderr
    good = tmp_path / "good.toml"
    good.write_text('[device]\nid = "pi-07"\n')
    assert appliance_cmd("config", "check", str(good)).returncode == 0


def test_env_override_errors_name_the_variable(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    result = appliance_cmd("config", "check", str(cfg), env={"APPLIANCE_HTTP_PORT": "eighty",
                                                              "APPLIANCE_MQTT_PROT": "1"})
    assert result.returncode == 2
    assert "APPLIANCE_HTTP_PORT = 'eighty': must be an integer" in result.stderr
    assert "APPLIANCE_MQTT_PROT: no such key mqtt.prot" in result.stderr


def test_serve_refuses_a_bad_config_with_exit_2(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[models]\ndefault = "nope"\n')
    result = appliance_cmd("serve", "-c", str(cfg), env={"APPLIANCE_DEVICE_STATE_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "models.default = 'nope': not in the catalog" in result.stderr


def test_models_list_and_verify(tmp_path, catalog_path):
    env = {"APPLIANCE_MODELS_CATALOG": str(catalog_path), "APPLIANCE_MODELS_DEFAULT": "tiny"}
    listed = appliance_cmd("models", "list", env=env)
    assert listed.returncode == 0 and "tiny (default)" in listed.stdout and "corrupt" in listed.stdout
    ok = appliance_cmd("models", "verify", "tiny", "slow", env=env)
    assert ok.returncode == 0 and ok.stdout.count("ok ") == 2
    bad = appliance_cmd("models", "verify", env=env)
    assert bad.returncode == 1
    line = next(x for x in bad.stdout.splitlines() if x.startswith("FAILED") and "corrupt" in x)
    assert "tiny-q4_0.gguf" in line and "0" * 64 in line and "file has" in line


def test_ask_over_both_transports(appliance):
    env = {"APPLIANCE_MQTT_PORT": str(appliance.config["mqtt"]["port"])}
    over_http = appliance_cmd("ask", "hello", "--http", appliance.http_url, "--raw", "--max-tokens", "6",
                              "--temperature", "0")
    assert over_http.returncode == 0, over_http.stderr
    over_mqtt = appliance_cmd("ask", "hello", "--mqtt", f"127.0.0.1:{appliance.config['mqtt']['port']}", "--device",
                              appliance.device, "--raw", "--max-tokens", "6", "--temperature", "0", env=env)
    assert over_mqtt.returncode == 0, over_mqtt.stderr
    assert over_http.stdout == over_mqtt.stdout and over_http.stdout.strip()
    streamed = appliance_cmd("ask", "hello", "--http", appliance.http_url, "--raw", "--max-tokens", "6",
                             "--temperature", "0", "--stream")
    assert streamed.stdout.strip() == over_http.stdout.strip()
    v311 = appliance_cmd("ask", "hello", "--mqtt", f"127.0.0.1:{appliance.config['mqtt']['port']}", "--device",
                         appliance.device, "--protocol", "3.1.1", "--raw", "--max-tokens", "6", "--temperature", "0")
    assert v311.stdout == over_http.stdout
    refused = appliance_cmd("ask", "hello", "--http", appliance.http_url, "--model", "nope")
    assert refused.returncode == 1 and "unknown_model" in refused.stderr


def test_serve_a_gguf_file_directly(tmp_path, models_dir):
    port = free_port()
    env = {"APPLIANCE_HTTP_PORT": str(port), "APPLIANCE_MQTT_ENABLED": "false",
           "APPLIANCE_DEVICE_STATE_DIR": str(tmp_path)}
    import os
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--model", str(models_dir / "tiny-f32.gguf")],
                            env={**os.environ, "PYTHONPATH": str(REPO), **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                status, body = http_post(f"http://127.0.0.1:{port}/v1/completions", {"prompt": "a", "max_tokens": 3})
                if status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        assert status == 200 and body["model"] == "tiny-f32"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_models_fit_on_gguf_models(catalog_path):
    """With a 4096-token context, tiny needs ~146 MiB and slow ~189 MiB: a 160 MiB budget fits one, not the other."""
    env = {"APPLIANCE_MODELS_CATALOG": str(catalog_path), "APPLIANCE_MODELS_DEFAULT": "tiny",
           "APPLIANCE_WORKER_CONTEXT_SIZE": "4096", "APPLIANCE_MEMORY_BUDGET_MIB": "160"}
    tight = appliance_cmd("models", "fit", env=env)
    assert tight.returncode == 1, tight.stdout + tight.stderr
    assert tight.stdout.splitlines()[0] == "available: 160 MiB (memory.budget_mib); context 4096, batch 256"
    verdicts = _fit_lines(tight.stdout)
    assert verdicts["tiny"][0] == "fits" and verdicts["tiny"][1].endswith(" = 146 MiB"), verdicts["tiny"]
    assert verdicts["slow"] == ("TOO BIG", "weights 16 + KV cache 8 + compute 37 + margin 128 = 189 MiB")
    roomy = appliance_cmd("models", "fit", env={**env, "APPLIANCE_MEMORY_BUDGET_MIB": "200"})
    assert roomy.returncode == 0, roomy.stdout
    verdicts = _fit_lines(roomy.stdout)
    assert {"tiny", "slow"} <= verdicts.keys() and {v for v, _ in verdicts.values()} == {"fits"}, verdicts


def test_models_fit_holds_the_catalog_against_what_a_1gib_pi_measured_leaves_free(catalog_path):
    """`--board pi3b+` weighs the catalog's models against the 728 MiB the image left free under QEMU's raspi3b (a
    measurement, not RAM less a reserve): at a 65536-token context slow's attention scores alone are 512 MiB."""
    env = {"APPLIANCE_MODELS_CATALOG": str(catalog_path), "APPLIANCE_MODELS_DEFAULT": "tiny",
           "APPLIANCE_WORKER_CONTEXT_SIZE": "65536"}
    pi3 = appliance_cmd("models", "fit", "--board", "pi3b+", env=env)
    assert pi3.returncode == 1, pi3.stdout + pi3.stderr
    assert pi3.stdout.splitlines()[0] == ("available: 728 MiB (measured for Pi 3B/3B+ (1 GB): free when the image's "
                                          "worker loads its model, the image booted under QEMU's raspi3b (--board "
                                          "pi3b+)); context 65536, batch 256")
    verdicts = _fit_lines(pi3.stdout)
    assert verdicts["slow"][0] == "TOO BIG" and verdicts["slow"][1].endswith(" = 789 MiB"), verdicts["slow"]
    assert verdicts["tiny"][0] == "fits", verdicts["tiny"]


def _fit_lines(out: str) -> dict[str, tuple[str, str]]:
    """model id -> (verdict, estimate) from `models fit` lines such as 'TOO BIG  slow: weights 16 + ... = 189 MiB'."""
    found = (re.fullmatch(r"(fits|TOO BIG) +(\S+): (.+)", line) for line in out.splitlines())
    return {m.group(2): (m.group(1), m.group(3)) for m in found if m}


def test_models_fit_names_the_shelf_entries_that_fit_this_machine_or_a_board(catalog_path):
    """After the catalog's models, every shelf model with its verdict and why; the exit status stays the
    catalog's. With --board, both are weighed against that board's planned free memory."""
    env = {"APPLIANCE_MODELS_CATALOG": str(catalog_path), "APPLIANCE_MODELS_DEFAULT": "tiny",
           "APPLIANCE_MEMORY_BUDGET_MIB": "400"}
    here = appliance_cmd("models", "fit", env=env)
    assert here.returncode == 0, here.stdout + here.stderr
    shelf = {model: verdict for verdict, model in re.findall(r"^  (fits|tight|TOO BIG) +(\S+) ", here.stdout, re.M)}
    assert shelf["smollm2-135m-instruct"] == "tight"  # 325 MiB of 400: under memory.low_mib's 256 left
    assert shelf["qwen2.5-1.5b-instruct"] == "TOO BIG"
    assert "needs about 1314 MiB, 914 MiB more than the 400 free" in here.stdout
    assert set(_fit_lines(here.stdout)) == {"tiny", "tiny-f32", "tiny-chat", "slow", "corrupt"}  # the catalog's

    pi3 = appliance_cmd("models", "fit", "--board", "pi3b+", env=env)
    assert pi3.stdout.splitlines()[0].startswith("available: 728 MiB (measured for Pi 3B/3B+ (1 GB)")
    assert "  fits     smollm2-135m-instruct (SmolLM2-135M-Instruct Q4_1, en, Apache-2.0): needs about 325 MiB, " \
           "leaves 403 MiB" in pi3.stdout
    assert re.search(r"^  TOO BIG  rwkv7-world-2.9b .*: needs about \d+ MiB, \d+ MiB more than the 728 free$",
                     pi3.stdout, re.M)
    pi4 = appliance_cmd("models", "fit", "--board", "pi4-1gb", env=env)
    assert pi4.stdout.splitlines()[0].startswith("available: 704 MiB (planned for Pi 4 / CM4 1 GB: 1024 MiB of RAM "
                                                 "less 320 for the OS (--board pi4-1gb))")
    unknown = appliance_cmd("models", "fit", "--board", "pi9", env=env)
    assert unknown.returncode == 2 and "--board 'pi9': unknown board (known: pi3b+, pi4-1gb" in unknown.stderr
