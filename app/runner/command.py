"""Which program runs as main_axcl, with which flags, environment and working directory."""
import json
import os
import platform
import pwd
import sys
from dataclasses import dataclass
from pathlib import Path

from app.paths import PROJECT_DIR
from app.runner import protocol
from app.runner.errors import RunnerStartError

EMULATOR = [sys.executable, "-m", "app.runner.emulator"]  # the emulated runner (emulator.py)
VENDOR_BINARIES = {"aarch64": "main_axcl_aarch64", "arm64": "main_axcl_aarch64", "x86_64": "main_axcl_x86"}
AXCL_LIBRARY_DIR = "/usr/lib/axcl"


@dataclass
class RunnerProgram:
    argv_prefix: list     # the program; the vendor flags follow
    emulated: bool
    description: str


def choose_program(binary, model_dir):
    """`binary` is "auto", "emulator" or a path. auto: the model folder's build for this machine, if any."""
    if binary == "emulator":
        return RunnerProgram(list(EMULATOR), True, "emulated runner (binary: emulator)")
    if binary == "auto":
        name = VENDOR_BINARIES.get(platform.machine())
        candidate = Path(model_dir) / name if name else None
        if candidate is None or not candidate.is_file():
            why = f"no {name} in {model_dir}" if name else f"no vendor build for {platform.machine()}"
            return RunnerProgram(list(EMULATOR), True,
                                 f"emulated runner (binary: auto, {why})")
        binary = candidate
    return RunnerProgram([str(binary)], False, f"main_axcl at {binary}")


def check_installation(program, model_dir):
    """The real binary and the files it loads: one clear message instead of its [E] lines."""
    binary = Path(program.argv_prefix[0])
    if not binary.is_file():
        raise RunnerStartError(f"cannot start the runner {binary}: no such file")
    if not os.access(binary, os.X_OK):
        raise RunnerStartError(f"cannot start the runner {binary}: not executable (chmod +x it)")
    sub = Path(model_dir) / protocol.MODEL_SUBDIR
    needed = [sub / f"qwen2_p128_l{i}_together.axmodel" for i in range(protocol.LAYERS)]
    needed += [sub / "qwen2_post.axmodel", sub / "model.embed_tokens.weight.bfloat16.bin"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise RunnerStartError(f"the model folder {model_dir} is incomplete: {missing[0]} is missing{more} "
                               "(scripts/download_models.sh fetches it)")


def check_embedding_writable(model_dir):
    """main_axcl opens the embedding table read-write and maps it shared: on a read-only one it crashes at
    start (docs/PROTOCOL.md, "Start-up"). Say so, and how to fix it, before spawning it."""
    table = Path(model_dir) / protocol.MODEL_SUBDIR / protocol.EMBED_FILE
    if table.is_file() and not os.access(table, os.R_OK | os.W_OK):
        try:
            user = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:  # a uid without a name (containers)
            user = str(os.geteuid())
        raise RunnerStartError(
            f"{table} is not writable by this service's user ({user}), and main_axcl opens it read-write (it "
            f"would crash at start): make the model folder writable, e.g. `sudo chown -R {user}: {model_dir}`, or "
            "remount it read-write; under systemd, keep it in the unit's ReadWritePaths")


def post_config(sampling):
    """post_config.json, which the runner reads once from its working directory."""
    top_k = sampling.get("top_k")
    top_p = sampling.get("top_p")
    penalty = sampling.get("repetition_penalty")
    temperature = sampling.get("temperature")
    return {
        "enable_temperature": temperature is not None,
        "temperature": temperature if temperature is not None else 1.0,
        "enable_top_k_sampling": bool(top_k),
        "top_k": top_k or 1,
        "enable_top_p_sampling": top_p is not None and top_p < 1.0,
        "top_p": top_p if top_p is not None else 1.0,
        "enable_repetition_penalty": penalty is not None and penalty != 1.0,
        "repetition_penalty": penalty if penalty is not None else 1.0,
        "penalty_window": sampling.get("penalty_window", 20),
    }


def prepare_workdir(workdir, sampling):
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "post_config.json").write_text(json.dumps(post_config(sampling), indent=4, sort_keys=True) + "\n")
    return workdir


def runner_env(program, emulator_settings, tokenizer_dir):
    """The runner's environment: ours, plus the AXCL library path or the emulator's knobs."""
    env = dict(os.environ)
    if program.emulated:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_DIR), env.get("PYTHONPATH")]))
        env["QWEN_EMULATOR_TOKENIZER"] = str(tokenizer_dir)
        for key, var in (("token_ms", "QWEN_EMULATOR_TOKEN_MS"), ("load_ms", "QWEN_EMULATOR_LOAD_MS"),
                         ("fault", "QWEN_EMULATOR_FAULT"), ("fault_file", "QWEN_EMULATOR_FAULT_FILE"),
                         ("trace", "QWEN_EMULATOR_TRACE")):
            value = emulator_settings.get(key)
            if value is not None and value != "":
                env[var] = str(value)
            else:
                env.pop(var, None)
    elif os.path.isdir(AXCL_LIBRARY_DIR) and AXCL_LIBRARY_DIR not in env.get("LD_LIBRARY_PATH", ""):
        # The vendor sets this in /etc/profile, which services never read.
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [AXCL_LIBRARY_DIR, env.get("LD_LIBRARY_PATH")]))
    return env
