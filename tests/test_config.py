from __future__ import annotations

from pathlib import Path

import pytest

from stagelock.config import Config, ConfigError, load_config, validate_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


@pytest.mark.parametrize(
    "path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda p: p.name
)
def test_every_example_validates(path: Path) -> None:
    config = load_config(path)
    assert config.source.kind == path.stem


def test_defaults_run_the_simulation_on_loopback() -> None:
    config = Config()
    assert config.source.kind == "simulated"
    assert config.publish.endpoint == "tcp://127.0.0.1:5556"
    assert config.control.endpoint == "tcp://127.0.0.1:5557"
    assert config.effective_pixel_size_um == pytest.approx(0.65)  # the simulation's


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            {"publish": {"endpont": "x"}},
            "publish.endpont: Extra inputs are not permitted",
        ),
        ({"pixel_size_um": 0}, "pixel_size_um: Input should be greater than 0"),
        ({"registration": {"n_regions": 0}}, "registration.n_regions: Input should be"),
        ({"source": {"kind": "folder"}}, "needs source.folder.path"),
        ({"stage": {"gian": 0.5}}, "stage.gian: Extra inputs are not permitted"),
        ({"stage": {"gain": 0.0}}, "stage.gain: Input should be greater than 0"),
        (
            {
                "stage": {"feedback": True},
                "source": {"kind": "folder", "folder": {"path": "."}},
            },
            "stage.feedback = true needs a stage",
        ),
        (
            {"stage": {"feedback": True}, "source": {"kind": "micromanager"}},
            "needs stage.calibration_file",
        ),
        (
            {"stage": {"auto_calibrate": True, "calibration_file": "c.toml"}},
            "both set",
        ),
        (
            {"publish": {"endpoint": "127.0.0.1:5556"}},
            "publish.endpoint: String should",
        ),
        ({"pixel_size_um": 0.5, "camera": {"pixel_size_um": 0.6}}, "disagree"),
    ],
    ids=[
        "typo",
        "zero",
        "n_regions",
        "folder-path",
        "stage-typo",
        "stage-gain",
        "feedback-folder",
        "feedback-uncalibrated",
        "calibration-twice",
        "endpoint",
        "two-sizes",
    ],
)
def test_bad_documents_give_one_line_naming_the_key(doc: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(doc)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_models_are_frozen() -> None:
    config = Config()
    with pytest.raises(ValueError, match="frozen"):
        config.publish.hwm = 5  # type: ignore[misc]


def test_overrides_revalidate_and_keep_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[publish]\nhwm = 10\n[registration]\nreference = 'mean'\n")
    config = load_config(path).with_overrides(
        source__kind="folder",
        source__folder__path=tmp_path,
        publish__endpoint="tcp://127.0.0.1:6000",
        frames=None,  # flag not given: file value kept
    )
    assert config.source.folder.path == tmp_path
    assert config.publish.hwm == 10 and config.publish.endpoint.endswith(":6000")
    assert config.registration.reference == "mean" and config.frames is None
    with pytest.raises(ConfigError, match="pixel_size_um: Input should be greater"):
        config.with_overrides(pixel_size_um=-2.0)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[publish\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text("[log]\nevery_n_frame = 3\n")
    with pytest.raises(ConfigError, match=r"typo\.toml: log\.every_n_frame: Extra"):
        load_config(typo)


def test_whole_document_errors_name_their_keys_without_a_prefix() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({"pixel_size_um": 0.5, "camera": {"pixel_size_um": 0.6}})
    assert str(info.value).startswith("pixel_size_um (0.5) and camera.pixel_size_um")


def test_stage_section_and_quickstart() -> None:
    config = validate_config(
        {"stage": {"feedback": True, "gain": 0.5, "calibration": {"pattern": "grid"}}}
    )
    assert config.stage.feedback and config.stage.gain == 0.5
    assert config.stage.calibration.pattern == "grid"
    assert not Config().stage.feedback  # a file must ask for feedback
    quick = Config.quickstart()  # `stagelock run` without a file
    assert quick.source.kind == "simulated" and quick.stage.feedback
    assert quick.log.every_n_frames == 10
    # flags still override the quickstart, and re-validate
    assert not quick.with_overrides(stage__feedback=False).stage.feedback
    assert quick.with_overrides(frames=5).stage.feedback


def test_simulation_defaults_drift_realistically() -> None:
    from stagelock.config import SimulationSettings

    sim = Config().simulation
    # ~3 µm a minute of creep at 10 frames/s, the same as the microscope's own
    assert sim.creep_um_per_s == SimulationSettings().creep_um_per_s == (0.05, -0.03)
    assert (
        sim.random_walk_um_per_sqrt_s == SimulationSettings().random_walk_um_per_sqrt_s
    )
    assert sim.frame_interval_ms == 100.0
    assert "frame_interval_ms" not in sim.microscope_settings()
    SimulationSettings.from_mapping(sim.microscope_settings())  # every key known
