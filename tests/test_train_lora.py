"""LoRA through peft: only the adapter trains, it is checkpointed, resumed and evaluated."""
import json

from trainer_utils import max_diff, state, tiny_config
from vaopd.eval import main as eval_main
from vaopd.tiny import build_model, build_tokenizer
from vaopd.models import base_model
from vaopd.train import train

LORA = ("model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "train.max_steps=2")


def test_lora_trains_the_adapter_only_and_resumes_exactly(tmp_path, capsys):
    straight = train(tiny_config(tmp_path, *LORA, name="straight"))
    base = state(build_model("student", build_tokenizer(), seed=0))
    trained = {k.replace("base_layer.", ""): v for k, v in state(base_model(straight.student)).items() if "lora_" not in k}
    assert max_diff(trained, base) == 0  # base weights untouched
    lora = {k: v for k, v in state(straight.student).items() if "lora_B" in k}
    assert lora and any(float(v.abs().max()) > 0 for v in lora.values())  # lora_B starts at 0: it moved
    assert (straight.checkpoint / "model" / "adapter_model.safetensors").is_file()
    assert not (straight.checkpoint / "model" / "model.safetensors").exists()

    cfg = tiny_config(tmp_path, *LORA, "train.stop_after=1", name="split")
    train(cfg)
    resumed = train(cfg, resume=True)
    assert max_diff(state(resumed.student), state(straight.student)) < 1e-6

    capsys.readouterr()
    assert eval_main(["--checkpoint", str(resumed.checkpoint), "--samples", "1", "--set", "data.tiny_val_size=1",
                      "--data", "tiny"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 1


def test_frozen_vision_tower_does_not_change(tmp_path):
    result = train(tiny_config(tmp_path, "model.freeze_vision=true", "train.max_steps=1"))
    fresh = build_model("student", build_tokenizer(), seed=0)
    assert max_diff(state(result.student.model.visual), state(fresh.model.visual)) == 0
    assert max_diff(state(result.student.model.language_model), state(fresh.model.language_model)) > 0
