"""From a real VLN federation to a site's navigation student: at the end of the run each site
fetches the final global state (aggregated after the last round, so no task carried it), writes
its adapted model (that state + its private factors) and evaluates that model; `ktfed participant
distill` then takes the file as its teacher and distills a student on the site's own data."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kt_core.models import private_state, shared_state
from kt_core.tasks import load_adapted, state_digest_of
from tests.test_audit_federation import verify_strictly
from tests.test_vln_federation import backbone, vln_config  # noqa: F401 - the module-scoped pretrained checkpoint

SITES = ("site-a", "site-b", "site-c")


def test_image_sites_write_the_final_global_state_with_their_private_factors(federation):
    """The same end of run for the image task (fast): the final state is fetched; each site keeps it,
    or its last local model where that scored higher on its validation part, and says which."""
    from tests.conftest import fast_config

    federation.start_coordinator(federation.write_config(fast_config(rounds=2, min_sites=3)))
    federation.wait_serving()
    for site in SITES:
        federation.start_participant(site)
    status = federation.wait_rounds(2, timeout=120)
    for proc in federation.participants.values():
        assert proc.wait(60) == 0
    run_id, final = status.header.run_id, status.global_state_digest
    for site in SITES:
        loaded = load_adapted(federation.workdir / "sites" / site / f"adapted-{run_id}.safetensors")
        evaluation = json.loads((federation.workdir / "sites" / site / f"evaluation-{run_id}.json").read_text())
        scores = evaluation["choice"]["validation_accuracy"]
        assert loaded.global_state_digest == final == evaluation["global_state_digest"]
        assert loaded.meta["kept"] == evaluation["model"] == evaluation["choice"]["kept"]
        if scores["last_local_model"] > scores["final_aggregate"]:
            assert loaded.meta["kept"] == "last local model" and state_digest_of(shared_state(loaded.model)) != final
        else:
            assert state_digest_of(shared_state(loaded.model)) == final
        assert loaded.site == site and loaded.round == 2 and loaded.config.task.kind == "image"


@pytest.mark.slow
def test_sites_keep_their_federated_model_and_distill_it(federation, backbone):  # noqa: F811
    federation.start_coordinator(federation.write_config(vln_config(backbone, rounds=2)))
    federation.wait_serving()
    for site in SITES:
        federation.start_participant(site)
    status = federation.wait_for(lambda: (s := federation.status()).state == "finished" and s, 240,
                                 "the vln run to finish")
    for proc in federation.participants.values():
        assert proc.wait(60) == 0
    final = status.global_state_digest
    assert final == status.rounds[-1].global_state_digest
    run_id = status.header.run_id

    loaded = {}
    for site in SITES:
        state = federation.workdir / "sites" / site
        loaded[site] = load_adapted(state / f"adapted-{run_id}.safetensors")   # backbone from its cache
        # the federated model: the coordinator's final global state, not the site's last local model
        assert state_digest_of(shared_state(loaded[site].model)) == final == loaded[site].global_state_digest
        assert (loaded[site].site, loaded[site].run_id, loaded[site].round) == (site, run_id, 2)
        evaluation = json.loads((state / f"evaluation-{run_id}.json").read_text())
        assert evaluation["model"] == "final global state + private factors"
        assert evaluation["global_state_digest"] == final
    assert [loaded[s].levels for s in SITES] == [(lv,) for lv in json.loads(loaded["site-a"].meta["run_config"])
                                                 ["vln"]["levels"]]
    # one global state, but each site's own factor selection
    a, b = (state_digest_of(private_state(loaded[s].model)) for s in ("site-a", "site-b"))
    assert a != b
    # the final download is in both audit logs, and they still verify
    dirs = [federation.workdir / "coordinator" / "audit"] + [federation.workdir / "sites" / s / "audit" for s in SITES]
    result = verify_strictly(dirs, federation.pki / "ca.crt")
    site_log = next(v for v in result.logs if v.producer == "site-a")
    received = [e.body for e in site_log.entries if e.kind == "boundary" and e.body["message"] == "state"]
    assert received[-1]["sha256"] == final and received[-1]["direction"] == "receive"

    # site-a distills its federated model, on its own demonstrations, in a process of its own
    state = federation.workdir / "sites" / "site-a"
    (state / "distill.toml").write_text(f"""
[distill]
task = "nav"
teacher = "adapted-{run_id}.safetensors"
method = "mixkd"
epochs = 1
batch_size = 32
lr = 3e-3
device = "cpu"
out_dir = "distill"

[distill.nav]
demo_cache = "demos"       # the demonstrations the site trained on (and its evaluation seeds)
student_d_model = 4        # the test's backbone is tiny: at half its width the embeddings alone are half
""")
    out = subprocess.run([sys.executable, "-m", "ktfed", "participant", "distill", "--config",
                          str(state / "distill.toml"), "--json", "--no-progress", "--log-level", "warning"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    teacher, student = report["teacher"], report["student"]
    assert (teacher["site"], teacher["run_id"], teacher["global_state_digest"]) == ("site-a", run_id, final)
    assert report["compression_vs_backbone"] >= 4 and teacher["backbone_parameters"] >= 4 * student["parameters"]
    assert report["levels"] == list(loaded["site-a"].levels) and report["data"]["site_index"] == 0
    # the same rollouts as the site's final evaluation: the teacher's SR / SPL are that evaluation's
    evaluation = json.loads((state / f"evaluation-{run_id}.json").read_text())
    assert report["data"]["eval_episodes_per_level"] == 2
    assert teacher["test"]["success_rate"] == pytest.approx(evaluation["success_rate"])
    assert teacher["test"]["spl"] == pytest.approx(evaluation["spl"])
    assert 0 <= student["test"]["success_rate"] <= 1 and 0 <= student["test"]["spl"] <= 1
    assert (state / "distill" / "student.safetensors").is_file() and (state / "distill" / "report.json").is_file()
