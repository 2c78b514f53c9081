"""The throughput benchmark runs at the tiny size and writes every field; the analytic FLOP
count equals torch's FLOP counter on the same architecture. No timing thresholds."""

from __future__ import annotations

import ast
import json

import pytest


def test_analytic_forward_flops_equal_torch_flop_counter():
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks import flops
    from p2l_jax.random_model import ARCHITECTURES, architecture_configs

    dicts, cfgs = ARCHITECTURES["tiny"], architecture_configs("tiny")
    unet, vae = UNet2DConditionModel.from_config(dicts["unet"]), AutoencoderKL.from_config(dicts["vae"])
    for net in (unet, vae):  # plain bmm attention: torch's counter skips the CPU SDPA kernel
        net.set_attn_processor(AttnProcessor())
    B, h, w = 2, 6, 4  # odd shapes exercise the rounding of the down/up samplers

    def counted(fn):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    z, x = torch.zeros(B, 4, h, w), torch.zeros(B, 3, 8 * h, 8 * w)
    C = torch.zeros(B, 77, dicts["unet"]["cross_attention_dim"])
    assert flops.unet_forward(cfgs["unet"], B, (h, w)).total == counted(lambda: unet(z, 10, C))
    assert flops.vae_decoder_forward(cfgs["vae"], B, (h, w)).total == counted(lambda: vae.decode(z))
    assert flops.vae_encoder_forward(cfgs["vae"], B, (8 * h, 8 * w)).total == counted(
        lambda: vae.encode(x))


def test_tiny_benchmark_writes_every_field(tmp_path):
    pytest.importorskip("torch")
    from benchmarks import throughput

    parser = __import__("argparse").ArgumentParser()
    throughput.add_arguments(parser)
    out, md = tmp_path / "r.json", tmp_path / "table.md"
    args = parser.parse_args(["--model", "tiny", "--resolution", "16", "--steps", "1",
                              "--solver", "ldps", "--repeats", "1", "--torch", "eager",
                              "--json", str(out), "--markdown", str(md)])
    assert throughput.main(args) == 0
    record = json.loads(out.read_text())
    assert set(throughput.RECORD_FIELDS) <= set(record)
    # LDPS never projects: its solve is the solve without projection, one step per step
    assert record["projection"] == "none" and record["compile_s_no_projection"] is None
    assert record["solve_step_time_s"] == record["solve_step_time_no_projection_s"] == (
        pytest.approx(record["solve_time_s"] - record["decode_time_s"]))
    assert record["torch"]["eager"]["step_time_projection_s"] is None
    assert record["jax_over_torch_solve"]["eager"]["projection"] is None
    assert record["jax_over_torch_solve"]["eager"]["no_projection"] == pytest.approx(
        record["solve_step_time_s"] / record["torch"]["eager"]["step_time_s"])
    assert len(record["device"]["load_average"]) == len(record["load_average_end"]) == 3
    assert record["config"]["model"] == "tiny" and record["parameters"] > 0
    assert {"step", "projection", "step_amortized", "step_program", "forward"} <= set(
        record["flops_per_step_analytic"])
    assert record["flops_per_step_xla"] > 0 and record["peak_memory"]["bytes"] > 0
    assert record["matmul_peak"]["flops_per_s"] > 0
    assert "step_time_s" in record["torch"]["eager"] and "eager" in record["jax_over_torch"]
    assert record["torch_side"]["process"] == "same"  # torch timed in this process
    assert record["torch_side"]["peak_memory"]["bytes"] >= record["peak_memory"]["bytes"]
    header, _, row = md.read_text().splitlines()
    assert header.count("|") == row.count("|")


def _bench_args(*extra):
    from benchmarks import throughput

    parser = __import__("argparse").ArgumentParser()
    throughput.add_arguments(parser)
    return parser.parse_args(["--model", "tiny", "--resolution", "16", "--steps", "1",
                              "--solver", "ldps", "--repeats", "1", "--torch", "eager", *extra])


def test_torch_process_times_torch_in_a_child_on_the_same_inputs(tmp_path):
    """--torch-process: the torch fields and ratios come from a child process that timed the
    same problem (its input fingerprint is this process's), with its own peak memory."""
    pytest.importorskip("torch")
    from benchmarks import throughput

    out = tmp_path / "r.json"
    assert throughput.main(_bench_args("--torch-process", "--json", str(out))) == 0
    record = json.loads(out.read_text())
    assert set(throughput.RECORD_FIELDS) <= set(record)
    side, eager = record["torch_side"], record["torch"]["eager"]
    assert side["process"] == "subprocess" and side["peak_memory"]["bytes"] > 0
    assert len(side["load_average"]) == len(side["load_average_end"]) == 3
    model, _ = throughput.build_model(throughput.config_from_args(_bench_args()))
    inputs = throughput.problem_inputs(throughput.config_from_args(_bench_args()), model)
    assert side["inputs"] == json.loads(json.dumps(throughput.input_fingerprint(inputs)))
    assert eager["step_time_s"] > 0 and len(eager["samples_s"]) == 1
    assert record["jax_over_torch"]["eager"] == pytest.approx(
        record["step_time_s"] / eager["step_time_s"])
    assert record["jax_over_torch_solve"]["eager"]["no_projection"] == pytest.approx(
        record["solve_step_time_no_projection_s"] / eager["step_time_s"])
    row = throughput.markdown_row(record)
    assert row.count("|") == throughput.MARKDOWN_HEADER.splitlines()[0].count("|")
    assert f"/ {side['peak_memory']['bytes'] / 2**30:.3g} |" in row


def test_compile_only_prints_compile_time_and_planned_memory(capsys):
    from benchmarks import throughput

    assert throughput.main(_bench_args("--compile-only", "--torch", "none")) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed) == {"compile_s", "xla_memory"} and printed["compile_s"] > 0
    assert printed["xla_memory"]["argument_bytes"] > 0


def test_torch_process_failure_is_one_line_naming_the_torch_side(tmp_path):
    from benchmarks import throughput
    from p2l_jax.errors import P2LError

    missing = tmp_path / "no_model"
    args = _bench_args("--torch-process")
    args.model = str(missing)
    with pytest.raises(P2LError) as err:
        throughput.main(args)
    message = str(err.value)
    assert "\n" not in message and message.startswith("--torch-process: the torch side")
    assert "exit status 1" in message and str(missing) in message


def test_solve_step_times_and_ratios_with_projection():
    """A projecting solver: the solve's per-step time with and without projection, each over
    the matching torch step (interleaved timings as benchmarks.measure returns them)."""
    from benchmarks import throughput

    cfg = throughput.BenchConfig(steps=4)
    times = {"jax_solve": {"median_s": 9.0, "samples_s": [9.0]},
             "jax_solve_no_projection": {"median_s": 5.0, "samples_s": [5.0]},
             "jax_step": {"median_s": 1.5, "samples_s": [1.5]},
             "jax_decode": {"median_s": 1.0, "samples_s": [1.0]}}
    record = {"projection": "prox", "flops_per_step_analytic": {"step": 3.0e9},
              "solve_flops": 30e9, "torch": {}, "jax_over_torch": {}, "jax_over_torch_solve": {}}
    record.update(throughput.timing_fields(cfg, times, record))
    assert record["solve_step_time_s"] == 2.0 and record["solve_step_time_no_projection_s"] == 1.0
    assert record["dispatch_time_s"] == 6.0 and record["achieved_flops_per_s"] == 2e9
    throughput.torch_ratios(record, "eager",
                            {"median_s": 0.5, "samples_s": [0.5], "first_call_s": 0.7},
                            {"median_s": 4.0, "samples_s": [4.0], "first_call_s": 4.0})
    assert record["jax_over_torch"]["eager"] == 3.0
    assert record["jax_over_torch_solve"]["eager"] == {"no_projection": 2.0, "projection": 0.5}
    assert record["torch"]["eager"]["compile_s"] == pytest.approx(0.2)
    throughput.torch_ratios(record, "compile", {"error": "RuntimeError: no compiler"}, {})
    assert record["torch"]["compile"] == {"error": "RuntimeError: no compiler"}
    assert "compile" not in record["jax_over_torch"]


def test_cpu_breakdown_times_every_network_pass_in_both_frameworks(capsys):
    pytest.importorskip("diffusers")
    from benchmarks import cpu_breakdown

    assert cpu_breakdown.main(["--model", "tiny", "--repeats", "1", "--forms",
                               "xla,cpu-ynn,cpu", "--decoder-blocks"]) == 0
    out = capsys.readouterr().out
    passes, blocks = out.split("| decoder block |")
    rows = [line.split("|")[1:-1] for line in passes.splitlines()
            if line.startswith("| ") and not line.startswith("| pass")]
    assert [r[0].strip() for r in rows] == ["unet forward", "unet vjp (z, C)",
                                            "decoder forward", "decoder vjp (z)",
                                            "encoder forward"]
    assert "| JAX xla s | JAX cpu-ynn s | JAX cpu s | torch eager s |" in passes
    for row in rows:
        jax_s, torch_s, ratios = row[1:4], row[4], row[5:]
        assert len(ratios) == 3 and float(torch_s) > 0
        for j, ratio in zip(jax_s, ratios):
            assert float(j) > 0
            assert float(ratio) == pytest.approx(float(j) / float(torch_s), rel=0.02, abs=0.01)
    # the decoder, block by block, each fed the previous block's output
    rows = [line.split("|")[1:-1] for line in blocks.splitlines()[2:] if line.startswith("| ")]
    names = [r[0].strip() for r in rows]
    assert names[:2] == ["conv_in", "mid block"] and names[-1] == "norm_out + SiLU + conv_out"
    assert names[2:-1] == [f"up block {i}" for i in range(len(names) - 3)] and len(names) > 3
    shapes = [ast.literal_eval(r[1].strip()) for r in rows]  # (B, H, W, C): the maps grow through the up blocks
    assert shapes[-1][1] > shapes[0][1]
    for _, _, jf, tf, rf, jv, tv, rv in rows:
        assert float(rf) == pytest.approx(float(jf) / float(tf), rel=0.02, abs=0.01)
        assert float(rv) == pytest.approx(float(jv) / float(tv), rel=0.02, abs=0.01)


def test_in_loop_runs_the_function_in_a_loop_body_not_hoisted():
    """benchmarks.measure.in_loop: the result is f's, and the compiled program keeps a while
    loop whose body holds f's matrix product (a one-trip scan, or a body that does not read
    the carry, would leave it in the entry computation)."""
    import re

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.measure import in_loop
    from hlo_text import called_lines

    f = lambda w, x: jnp.tanh(x @ w)
    w = jax.random.normal(jax.random.key(0), (64, 64)) / 8
    x = jax.random.normal(jax.random.key(1), (32, 64))
    g = in_loop(f, carried=1)
    np.testing.assert_allclose(g(w, x), f(w, x), rtol=1e-5, atol=1e-6)
    hlo = g.lower(w, x).compile().as_text()
    body = re.search(r"while\(.*body=%([\w.\-]+)", hlo).group(1)
    assert any(re.search(r"\bdot\(", line) for line in called_lines(hlo, body))
    hoisted = jax.jit(lambda w, x: jax.lax.scan(lambda c, _: (c, f(w, x)), 0, None,
                                                length=2)[1]).lower(w, x).compile().as_text()
    loops = re.findall(r"while\(.*body=%([\w.\-]+)", hoisted)  # the check can fail
    assert not any(re.search(r"\bdot\(", line)
                   for b in loops for line in called_lines(hoisted, b))


def test_cpu_conv_programs_keep_their_convolution_in_the_loop_body():
    """benchmarks/cpu_conv.py: the forward and the input-gradient programs each run their
    convolution in the loop body, and equal the convolution and its transpose. The input
    gradient does not depend on x: a loop carrying x instead of the cotangent is hoisted
    (checked below, so the check can fail)."""
    import re

    import jax
    import numpy as np

    from benchmarks.cpu_conv import conv_programs
    from benchmarks.measure import conv_form, in_loop
    from hlo_text import called_lines
    from p2l_jax.models.conv import conv2d

    def in_body(prog, args):
        hlo = prog.lower(*args).compile().as_text()
        bodies = re.findall(r"while\(.*body=%([\w.\-]+)", hlo)
        return any(re.search(r"\bconvolution\(", line)
                   for b in bodies for line in called_lines(hlo, b))

    plain = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    with conv_form("cpu"):
        (fwd, fargs), (vjp, vargs) = conv_programs(side=8, ch=16, batch=1)
        w, x, g = vargs
        np.testing.assert_allclose(fwd(*fargs), plain(x, w), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(vjp(*vargs), jax.vjp(lambda x: plain(x, w), x)[1](g)[0],
                                   rtol=1e-5, atol=1e-5)
        assert in_body(fwd, fargs) and in_body(vjp, vargs)
        conv = lambda x, w: conv2d(x, w, (1, 1), ((1, 1), (1, 1)))
        hoisted = in_loop(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
        assert not in_body(hoisted, (x, w, g))


def test_cpu_conv_winograd_table_times_both_forms_and_names_the_rule(monkeypatch, capsys):
    """``benchmarks.cpu_conv --tables winograd``: one row per shape with Eigen and Winograd
    times, their ratio, and whether conv2d's rule picks Winograd (floors lowered so that one
    small shape qualifies and one does not)."""
    from benchmarks import cpu_conv
    from p2l_jax.models import conv

    monkeypatch.setattr(conv, "WINOGRAD_MIN_CHANNELS", 16)
    monkeypatch.setattr(conv, "WINOGRAD_MIN_POSITIONS", 64)
    monkeypatch.setattr(cpu_conv, "WINOGRAD_MAPS", (("a", 8, 16), ("b", 8, 8)))
    assert cpu_conv.main(["--tables", "winograd", "--repeats", "1"]) == 0
    rows = [ln.split(" | ") for ln in capsys.readouterr().out.splitlines()
            if ln.startswith("| a |") or ln.startswith("| b |")]
    assert [r[1] for r in rows] == ["yes", "no"]
    for r in rows:
        eigen, wino, ratio = float(r[2]), float(r[3]), float(r[4].rstrip(" |"))
        assert eigen > 0 and wino > 0
        assert ratio == pytest.approx(wino / eigen, rel=0.02, abs=0.01)


def test_winograd_pair_compiles_the_step_with_and_without_winograd(monkeypatch, capsys):
    """``--pair winograd``: the first program takes the Winograd rule (floors lowered so the
    tiny model has such convolutions), the second keeps them in Eigen: fewer convolutions in
    the first optimized program, and both timed."""
    from benchmarks import options_pair
    from p2l_jax.models import conv

    monkeypatch.setenv("P2L_JAX_CONV", "cpu")
    monkeypatch.setattr(conv, "WINOGRAD_MIN_CHANNELS", 8)
    monkeypatch.setattr(conv, "WINOGRAD_MIN_POSITIONS", 16)
    assert options_pair.main(["--model", "tiny", "--resolution", "64", "--program", "step",
                              "--rounds", "1", "--pair", "winograd"]) == 0
    out = capsys.readouterr().out
    convs = {name: int(out.split(f"{name}: compiled in ")[1].split(" s, ")[1].split()[0])
             for name in ("winograd", "eigen")}
    assert convs["winograd"] < convs["eigen"]
    assert conv.WINOGRAD_MIN_CHANNELS == 8  # the rule is restored after tracing
    assert "winograd / eigen: " in out


@pytest.mark.parametrize("program", [
    "step", pytest.param("solve", marks=pytest.mark.slow)])  # the step covers the script's code
def test_options_pair_times_both_compilations_of_one_program(program, capsys):
    from benchmarks import options_pair

    assert options_pair.main(["--model", "tiny", "--resolution", "64", "--program", program,
                              "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    medians = {}
    for name in ("package", "defaults"):
        line = next(ln for ln in out.splitlines() if ln.startswith(f"{name}: ") and "median" in ln)
        samples = [float(v) for v in line.split(":")[1].split(" s,")[0].split(" / ")]
        assert len(samples) == 2 and min(samples) > 0
        medians[name] = float(line.rsplit("median", 1)[1].split()[0])
    ratio = float(out.split("package / defaults: ")[1].split(";")[0])
    assert ratio == pytest.approx(medians["package"] / medians["defaults"], rel=0.01)
