"""One scene with every region control at once, end to end through the CLI: made, recorded, reproduced."""

from __future__ import annotations

import numpy as np
from conftest import write
from PIL import Image
from tinymodel import write_tiny_controlnet, write_tiny_ip_adapter, write_tiny_lora

SIZE = 64


def test_a_scene_with_every_control_generates_records_and_reproduces(run_cli, tiny_model, tmp_path):
    import torch
    from safetensors.torch import save_file

    from smd_cli.app.records import read_record

    rng = np.random.default_rng(0)
    for name in ("pose", "depth", "girl-ref"):
        Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{name}.png")
    write_tiny_lora(tiny_model, tmp_path / "loras", seed=0, name="film-grain.safetensors")
    write_tiny_lora(tiny_model, tmp_path / "loras", seed=1, name="character.safetensors")
    write_tiny_controlnet(tiny_model, tmp_path / "controlnet")
    write_tiny_ip_adapter(tiny_model, tmp_path / "ip")
    width = 32  # the tiny text encoder's
    save_file({"emb_params": torch.randn(2, width, generator=torch.Generator().manual_seed(0))},
              str(tmp_path / "bad-hands.safetensors"))
    long = ", ".join(f"a {w} house by the sea" for w in ["red", "blue", "tall", "small", "green", "old"] * 3)
    scene = write(tmp_path / "all.yaml", f"""seed: 5
width: {SIZE}
height: {SIZE}
guidance_scale: 2.0
negative_auto: true
loras:
  - {{path: loras/film-grain.safetensors, scale: 0.6}}
controlnet:
  - {{model: controlnet, image: pose.png, scale: 1.0, start: 0.0, end: 1.0}}
embeddings: [bad-hands.safetensors]
background:
  prompt: "{long}"
  negative_prompt: "(bad-hands:1.2)"
layers:
  - prompt: "1girl, (pink hair:1.3), leather jacket, [hat]"
    mask: {{rect: [0, 0, 0.5, 1]}}
    loras: [{{path: loras/character.safetensors, scale: 0.8}}]
    controlnet: [{{model: controlnet, image: depth.png, scale: 0.7}}]
    reference: {{image: girl-ref.png, scale: 0.6, adapter: ip/ip-adapter.safetensors}}
  - prompt: a lake
    mask: {{rect: [0.5, 0, 1, 1]}}
""")
    assert run_cli("validate", scene).exit_code == 0
    out = tmp_path / "all.png"
    result = run_cli("generate", scene, "--model", tiny_model, "--lcm-lora", "none", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output  # nothing cut, nothing ignored
    record = read_record(out)
    recorded = {p for p in record.files}
    for name in ("loras/film-grain.safetensors", "loras/character.safetensors", "pose.png", "depth.png",
                 "girl-ref.png", "bad-hands.safetensors"):
        assert str((tmp_path / name).absolute()) in recorded, name
    again = tmp_path / "again.png"
    assert run_cli("reproduce", out, "--out", again).exit_code == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
