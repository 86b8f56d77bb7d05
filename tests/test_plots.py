"""What the plots and the progress output say, checked on the matplotlib objects (before
anything is saved) and on the text a piped log receives."""

import io
import math

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.container import ErrorbarContainer

from locotrain import report
from locotrain.metrics import Recorder, evaluate_with_progress
from locotrain.workloads import EvalResult

from conftest import tiny_config


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def evals_of(bpcs, windows=200, full=1716, bound=False, sim=True, tokens_per=1000,
             bytes_per=1_000_000):
    """Evaluations at 0, 1000, ... tokens on `windows` windows, then the final one at the
    last evaluation's tokens on all `full` windows."""
    out = []
    for i, bpc in enumerate(bpcs):
        e = {"event": "eval", "step": i, "tokens": i * tokens_per, "time_s": 0.5 * i,
             "val_bpc": bpc, "bytes_sent": i * bytes_per, "windows": windows}
        if sim:
            e["sim_time_s"] = 2.0 * i
        if bound:
            e["val_bpc_stderr"] = 0.01
        out.append(e)
    final = dict(out[-1], val_bpc=bpcs[-1] - 0.02, windows=full, final=True)
    return out + [final]


def markers(ax):
    """(x, y, hollow) of every drawn marker."""
    pts = []
    for line in ax.get_lines():
        if line.get_marker() in (None, "None", "") or not len(line.get_xdata()):
            continue
        hollow = line.get_markerfacecolor() in ("white", (1.0, 1.0, 1.0, 1.0))
        pts += [(x, y, hollow) for x, y in zip(line.get_xdata(), line.get_ydata())]
    return sorted(pts)


def legend_texts(legend):
    return [t.get_text() for t in legend.get_texts() if t.get_text()]


def curve_legend(fig):
    """The curves' legend sits under the plot, never over a curve."""
    assert fig.axes[0].get_legend() is None and len(fig.legends) == 1
    return legend_texts(fig.legends[0])


# --------------------------------------------------------------------------- loss curves


def test_final_evaluation_is_one_full_point_and_subset_points_are_hollow():
    fig = report.curves_figure({"diloco": evals_of([6.0, 4.0, 3.5])}, "tokens",
                               "training tokens (all workers)", "diloco")
    ax = fig.axes[0]
    pts = markers(ax)
    xs = [p[0] for p in pts]
    assert len(xs) == len(set(xs)) == 3  # the last partial evaluation gives way to the final
    assert pts[-1] == (2000, pytest.approx(3.48), False)  # the final: filled
    assert all(hollow for x, _, hollow in pts if x < 2000)  # the subset ones: hollow
    labels = curve_legend(fig)
    assert "all 1716 validation windows" in labels
    assert any("subset: 200 windows" in t for t in labels)
    assert ax.get_title().splitlines() == ["diloco", "validation bpc against training tokens"]
    assert ax.get_ylabel() == "validation bits per character"


def test_no_subset_note_when_every_evaluation_uses_all_windows():
    fig = report.curves_figure({"ddp": evals_of([6.0, 4.0], windows=1716)}, "tokens",
                               "training tokens", "ddp")
    assert not any("subset" in t for t in curve_legend(fig))
    assert not any(hollow for *_, hollow in markers(fig.axes[0]))


def test_comparison_title_names_what_is_compared():
    runs = {"ddp": evals_of([6.0, 3.3]), "diloco": evals_of([6.0, 3.4]),
            "streaming+codec=fp4": evals_of([6.0, 3.5])}
    fig = report.curves_figure(runs, "sim_time_s", "simulated time (s)", "quickstart")
    title = fig.axes[0].get_title()
    assert "quickstart: ddp vs diloco vs streaming+codec=fp4" in title.replace("\n", " ")
    assert title.endswith("validation bpc against simulated time")
    assert [t for t in curve_legend(fig) if "windows" not in t] == list(runs)
    ends = sorted(t.get_text() for t in fig.axes[0].texts)
    assert ends == ["3.280", "3.380", "3.480"]  # each run's final value at the right


def test_bytes_axis_is_logarithmic_from_the_first_nonzero_value():
    fig = report.curves_figure({"diloco": evals_of([6.0, 4.0, 3.5, 3.4])}, "bytes_sent",
                               "bytes sent", "quickstart", logx=True)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    xs = [p[0] for p in markers(ax)]
    assert min(xs) == 1_000_000  # the evaluation at 0 bytes is left out...
    assert 0 < ax.get_xlim()[0] and ax.get_xlim()[0] > 1_000_000 / 10  # no empty decades
    assert "not shown: the evaluation at bytes sent = 0 (6.000 bpc)" in ax.get_xlabel()  # ...and said so
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert any(t.endswith("MB") for t in ticks)


def test_diffusion_curve_is_an_upper_bound_with_error_bars():
    fig = report.curves_figure({"diloco": evals_of([6.0, 4.8, 4.5], bound=True)}, "tokens",
                               "training tokens", "diloco (masked_diffusion)")
    ax = fig.axes[0]
    assert ax.get_ylabel().startswith("\u2264 validation bits per character")
    assert "upper bound" in ax.get_ylabel()
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1 and len(bars[0].lines[2][0].get_segments()) == 3
    assert [t.get_text() for t in ax.texts] == ["\u2264 4.480 \u00b10.010"]


def test_mixed_comparison_marks_the_bound_in_the_legend():
    runs = {"ar": evals_of([6.0, 3.3]), "diffusion": evals_of([6.0, 4.3], bound=True)}
    fig = report.curves_figure(runs, "tokens", "training tokens", "workloads")
    labels = curve_legend(fig)
    assert "ar" in labels and "diffusion (\u2264 upper bound)" in labels
    assert "where marked" in fig.axes[0].get_ylabel()


# --------------------------------------------------------------------------- timeline


def spans_of(process, *items):
    return [{"process": process, "kind": k, "start": s, "end": e} for k, s, e in items]


def test_time_shares():
    spans = (spans_of("w0", ("compute", 0, 8), ("blocked", 8, 10), ("comm", 7, 10))
             + spans_of("w1", ("compute", 1, 5), ("idle", 5, 10)))
    shares = report.time_shares(spans)
    assert shares["w0"] == pytest.approx({"compute": 0.8, "blocked": 0.2, "idle": 0.0, "gap": 0.0,
                                          "comm": 0.3, "comm_hidden": 1 / 3})
    assert shares["w1"] == pytest.approx({"compute": 0.4, "blocked": 0.0, "idle": 0.5, "gap": 0.1})


def test_timeline_legend_is_outside_and_complete_with_shares_and_comm_lane():
    spans = (spans_of("w0", ("compute", 0, 8), ("blocked", 8, 10), ("comm", 7, 10))
             + spans_of("w1", ("compute", 0, 10), ("comm", 7, 9)))
    fig = report.timeline_figure(spans, "streaming+codec=fp4: where each process's time goes")
    ax = fig.axes[0]
    assert ax.get_legend() is None and len(fig.legends) == 1  # not over the bars
    labels = legend_texts(fig.legends[0])
    assert [t.split()[0] for t in labels] == ["compute", "blocked", "idle", "comm"]  # idle even if absent
    texts = [t.get_text() for t in ax.texts]
    assert texts[0].startswith("80% compute \u00b7 20% blocked \u00b7 0% idle")
    assert "30% on the wire, 33% of it hidden" in texts[0]
    assert "100% of it hidden" in texts[1]
    assert "gap" not in texts[0] + texts[1]
    comm = [c for c in ax.collections
            if tuple(c.get_facecolor()[0][:3]) == pytest.approx(
                tuple(int(report.COLORS["comm"][i:i + 2], 16) / 255 for i in (1, 3, 5)))]
    assert len(comm) == 2  # one lane per process
    assert ax.get_xlabel() == "simulated time (s)"
    assert ax.get_title().startswith("streaming+codec=fp4")


def test_real_process_timeline_has_no_comm_entry_and_names_its_gaps():
    spans = spans_of("w0", ("compute", 0, 1)) + spans_of("w1", ("compute", 0, 0.5), ("compute", 0.75, 1))
    fig = report.timeline_figure(spans, "ddp", clock="wall-clock")
    assert [t.split()[0] for t in legend_texts(fig.legends[0])] == ["compute", "blocked", "idle", "gap:"]
    assert fig.axes[0].texts[1].get_text().endswith("25% gap")
    assert "wall-clock" in fig.axes[0].get_xlabel()


def capture_run_plots(monkeypatch, tmp_path, evals, spans, label, config=None):
    saved = {}
    monkeypatch.setattr(report, "_save", lambda fig, path: saved.__setitem__(path.name, fig))
    if config is not None:
        (tmp_path / "config.toml").write_text(config)
    report.plot_run(tmp_path, evals, spans, label)
    return saved


def test_real_runtime_run_is_labelled_wall_clock(monkeypatch, tmp_path):
    evals = evals_of([6.0, 4.0, 3.5], sim=False)
    spans = spans_of("w0", ("compute", 0.3, 1.0), ("blocked", 1.0, 1.2))
    saved = capture_run_plots(monkeypatch, tmp_path, evals, spans, "ddp")
    assert saved["timeline.png"].axes[0].get_xlabel() == "wall-clock time since the run started (s)"
    assert "simulated" not in saved["loss_vs_time.png"].axes[0].get_xlabel()
    assert "wall-clock" in saved["loss_vs_time.png"].axes[0].get_xlabel()


def test_simulated_run_plots_use_the_variant_label(monkeypatch, tmp_path):
    config = ('[workload]\nname = "masked_diffusion"\n\n[algorithm]\nname = "streaming"\n\n'
              '[algorithm.streaming]\ncodec = "fp4"\nH = 20\n')
    evals = evals_of([6.0, 4.8, 4.5], bound=True)
    spans = spans_of("w0", ("compute", 0, 1))
    saved = capture_run_plots(monkeypatch, tmp_path, evals, spans, "streaming", config)
    assert sorted(saved) == ["loss.png", "loss_vs_bytes.png", "loss_vs_time.png", "timeline.png"]
    for name, fig in saved.items():
        assert fig.axes[0].get_title().startswith("streaming+codec=fp4 (masked_diffusion)"), name
    assert saved["timeline.png"].axes[0].get_xlabel() == "simulated time (s)"
    assert saved["loss_vs_time.png"].axes[0].get_xlabel() == "simulated time (s)"
    assert "upper bound" in saved["loss.png"].axes[0].get_ylabel()


def test_run_that_sent_nothing_has_no_bytes_plot(monkeypatch, tmp_path):
    evals = [dict(e, bytes_sent=0) for e in evals_of([6.0, 4.0])]
    saved = capture_run_plots(monkeypatch, tmp_path, evals, [], "ddp")
    assert sorted(saved) == ["loss.png", "loss_vs_time.png"]


# --------------------------------------------------------------------------- progress


class FakeWorkload:
    """Evaluates instantly; reports windows as it goes when asked to."""

    def __init__(self, full=100):
        self.full = full
        self.bpc = 6.0

    def evaluate(self, named, limit=0, progress=None):
        n = limit or self.full
        for done in range(0, n + 1, 25):
            if progress:
                progress(done, n)
        self.bpc -= 0.5
        return EvalResult(self.bpc * math.log(2), self.bpc, 0.0, False, n)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def drive(recorder, total=1000, step=250):
    for tokens in range(0, total + 1, step):
        if tokens:
            recorder.on_train(step, 1, torch.tensor(1.0))
        recorder.publish([0], tokens, tokens // step, dict)
    return recorder.finish()


def test_piped_progress_is_one_plain_line_per_evaluation():
    stream = io.StringIO()
    recorder = Recorder(FakeWorkload(), ["w"], 1000, 250, 10, None, label="ddp", stream=stream)
    drive(recorder)
    out = stream.getvalue()
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert len(lines) == len(recorder.evals) == 6
    assert lines[1].startswith("ddp: 250/1,000 tokens (25%), val 5.000 bpc on 10 windows, ")
    assert all(line.endswith(" s elapsed") for line in lines)
    assert lines[-1].startswith("ddp: final, 1,000 tokens, val 3.000 bpc on all 100 windows")


def test_piped_final_evaluation_reports_windows_done():
    stream = io.StringIO()
    recorder = Recorder(FakeWorkload(), ["w"], 1000, 500, 10, None, label="ddp", stream=stream,
                        progress_every_s=0)
    drive(recorder, step=500)
    lines = stream.getvalue().splitlines()
    progress = [line for line in lines if line.startswith("ddp final eval:")]
    assert progress == [f"ddp final eval: {n}/100 windows ({n}%), 0 s" for n in (25, 50, 75)]
    assert len(lines) == len(recorder.evals) + 3


def test_terminal_gets_bars_and_quiet_gets_nothing():
    term = Terminal()
    drive(Recorder(FakeWorkload(), ["w"], 1000, 250, 10, None, label="ddp", stream=term))
    assert "\r" in term.getvalue() and "100/100" in term.getvalue()  # the final eval's bar
    silent = io.StringIO()
    drive(Recorder(FakeWorkload(), ["w"], 1000, 250, 10, None, quiet=True, stream=silent))
    assert silent.getvalue() == ""


@pytest.mark.parametrize("workload", ["ar_gpt", "masked_diffusion"])
def test_windows_progress_of_the_real_workloads(workload):
    from locotrain.setup import build

    wl = build(tiny_config(f"workload.name={workload}", "workload.loopholing=true"
                           if workload == "masked_diffusion" else "workload.context_len=0")).workload
    params = wl.init_params(0)
    calls = []
    result = evaluate_with_progress(wl, params, 40, lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 40) and calls[-1] == (40, 40)
    assert all(total == 40 for _, total in calls) and len(calls) >= 2
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert "_forward" not in vars(wl) and "val_windows" not in vars(wl)  # unhooked
    assert result.val_bpc == wl.evaluate(params, 40).val_bpc
