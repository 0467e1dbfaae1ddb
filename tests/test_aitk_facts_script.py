"""scripts/aitk_facts.py: the conformance data is regenerated from an ai-toolkit git repository.

CI has no ai-toolkit, so the script is run on a small repository laid out like ai-toolkit (the
same files, the same code shapes the script reads). With ``AITK_CHECKOUT`` set to a real clone or
mirror, the committed ``tests/data/aitk/`` is also compared with a fresh regeneration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "aitk_facts.py"
DATA = Path(__file__).parent / "data" / "aitk"

FILES = {
    "requirements.txt": "-r requirements_base.txt\nscipy==1.12.0\n",
    "requirements_base.txt": "prodigyopt\nbitsandbytes\ngit+https://github.com/huggingface/diffusers.git@abc\n",
    "toolkit/config.py": '''\
import re
import json
import oyaml as yaml


def replace_env_vars_in_string(s):
    return re.sub(r'\\$\\{([^}]+)\\}', replacer, s)


def preprocess_config(config, name=None):
    config_string = json.dumps(config)
    config_string = config_string.replace("[name]", name)
    return json.loads(config_string)


fixed_loader = yaml.SafeLoader
fixed_loader.add_implicit_resolver(
    u'tag:yaml.org,2002:float',
    re.compile(u\'\'\'^(?:[-+]?[0-9]+[eE][0-9]+)$\'\'\', re.X),
    list(u'-+0123456789.'))
''',
    "toolkit/prompt_utils.py": '''\
def inject_trigger_into_prompt(prompt, trigger=None):
    default_replacements = ["[name]", "[trigger]"]
''',
    "toolkit/config_modules.py": '''\
class SaveConfig:
    def __init__(self, **kwargs):
        self.dtype = kwargs.get('dtype', 'float16')


class SampleItem:
    def __init__(self, sample_config, **kwargs):
        self.prompt = kwargs.get('prompt', None)


class SampleConfig:
    def __init__(self, **kwargs):
        self.prompts = kwargs.get('prompts', [])
        self.samples = [SampleItem(self, **item) for item in []]


class TrainConfig:
    def __init__(self, **kwargs):
        self.gradient_accumulation = kwargs.get('gradient_accumulation', 1)
        self.ema_config = EMAConfig(**kwargs.get('ema_config', {}))


class EMAConfig:
    def __init__(self, **kwargs):
        self.use_ema = kwargs['use_ema']


class NetworkConfig:
    def __init__(self, **kwargs):
        self.linear = kwargs.get('linear', None)


class ModelConfig:
    def __init__(self, **kwargs):
        self.name_or_path = kwargs.get('name_or_path', None)


class LoggingConfig:
    def __init__(self, **kwargs):
        self.log_every = kwargs.get('log_every', 100)


class DatasetConfig:
    def __init__(self, **kwargs):
        self.folder_path = kwargs.get('folder_path', None)


class GenerateImageConfig:
    def _process_prompt_string(self):
        prompt = self.prompt
        p_split = prompt.split('--')
''',
    "jobs/BaseJob.py": '''\
class BaseJob:
    def __init__(self, config):
        self.config = config['config']
        self.job = config['job']
        self.name = self.get_conf('name', required=True)
        if 'meta' in config:
            self.meta = config['meta']

    def load_processes(self, process_dict):
        if len(self.config['process']) == 0:
            raise ValueError('no process')
        for i, process in enumerate(self.config['process']):
            cls = process_dict[process['type']]
''',
    "jobs/process/BaseProcess.py": '''\
class BaseProcess:
    def __init__(self, process_id, job, config):
        self.name = self.get_conf('name', job.name)
''',
    "jobs/process/BaseTrainProcess.py": '''\
class BaseTrainProcess:
    def __init__(self, process_id, job, config):
        self.training_folder = self.get_conf('training_folder', None)
''',
    "jobs/process/BaseSDTrainProcess.py": '''\
class BaseSDTrainProcess:
    def __init__(self, process_id, job, config):
        self.network_config = NetworkConfig(**self.get_conf('network', {}))
        self.train_config = TrainConfig(**self.get_conf('train', {}))
        self.model_config = ModelConfig(**self.get_conf('model', {}))
        self.save_config = SaveConfig(**self.get_conf('save', {}))
        self.sample_config = SampleConfig(**self.get_conf('sample', {}))
        self.logging_config = LoggingConfig(**self.get_conf('logging', {}))
        self.trigger_word = self.get_conf('trigger_word', None)
        for raw_dataset in self.get_conf('datasets', None):
            dataset = DatasetConfig(**raw_dataset)
''',
    "extensions_built_in/sd_trainer/SDTrainer.py": "class SDTrainer:\n    pass\n",
    "toolkit/optimizer.py": '''\
def get_optimizer(params, optimizer_type='adam', optimizer_params=None):
    if optimizer_params is None:
        optimizer_params = {}
    lower_type = optimizer_type.lower()
    if lower_type.startswith("dadaptation"):
        import dadaptation
        if lower_type.endswith('lion'):
            optimizer = 1
    elif lower_type.startswith("prodigy"):
        from prodigyopt import Prodigy
        optimizer = Prodigy(params)
    elif lower_type.endswith("8bit"):
        import bitsandbytes
        if lower_type == "adamw8bit":
            return 1
        else:
            raise ValueError('unknown')
    elif lower_type == 'adamw':
        optimizer = 2
    else:
        raise ValueError('unknown')
    return optimizer
''',
    "toolkit/sampler.py": '''\
def get_sampler(sampler, kwargs=None, arch="sd"):
    if sampler == "ddpm":
        cls = 1
    elif sampler == "euler" or sampler == "k_euler":
        cls = 2
    elif sampler == "flowmatch":
        cls = 3
    else:
        raise ValueError("not supported")
''',
    "toolkit/train_tools.py": '''\
def get_torch_dtype(dtype_str):
    if dtype_str == "fp16" or dtype_str == "half":
        return 1
    if dtype_str == "bf16":
        return 2
    return dtype_str
''',
}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True, env={**os.environ, "GIT_AUTHOR_NAME": "t",
                                          "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                                          "GIT_COMMITTER_EMAIL": "t@t"}).stdout.strip()


def _run(repo: Path, commit: str, out: Path) -> dict[str, dict]:
    done = subprocess.run([sys.executable, str(SCRIPT), str(repo), "--commit", commit,
                           "--out", str(out)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return {p.name: json.loads(p.read_text(encoding="utf-8")) for p in out.glob("*.json")}


def test_the_script_reads_the_facts_from_a_commit(tmp_path: Path) -> None:
    repo = tmp_path / "ai-toolkit"
    for name, text in FILES.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text, encoding="utf-8")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "one")
    commit = _git(repo, "rev-parse", "HEAD")
    (repo / "toolkit" / "sampler.py").write_text("changed in the work tree, not committed\n")

    data = _run(repo, commit, tmp_path / "out")
    keys, names, loader = data["config_keys.json"], data["names.json"], data["loader.json"]
    assert keys["commit"] == names["commit"] == loader["commit"] == commit
    assert keys["classes"]["TrainConfig"] == {
        "ema_config": "toolkit/config_modules.py:20",
        "gradient_accumulation": "toolkit/config_modules.py:19"}
    assert keys["classes"]["EMAConfig"] == {"use_ema": "toolkit/config_modules.py:25"}
    assert keys["process"]["trigger_word"] == "jobs/process/BaseSDTrainProcess.py:9"
    assert keys["process"]["type"] == "jobs/BaseJob.py:13"
    assert keys["sections"]["datasets[]"] == {"class": "DatasetConfig",
                                              "source": "jobs/process/BaseSDTrainProcess.py:11"}
    assert keys["sections"]["sample.samples[]"]["source"] == "toolkit/config_modules.py:14"
    assert set(keys["job"]["(root)"]) == {"job", "config", "meta"}
    # the committed sampler.py is read, not the changed work tree
    assert names["samplers"] == {"ddpm": "toolkit/sampler.py:2", "euler": "toolkit/sampler.py:4",
                                 "flowmatch": "toolkit/sampler.py:6",
                                 "k_euler": "toolkit/sampler.py:4"}
    assert names["dtypes"] == {"bf16": "toolkit/train_tools.py:4",
                               "fp16": "toolkit/train_tools.py:2", "half": "toolkit/train_tools.py:2"}
    assert [(b["when"], b["accept"], b["imports"]) for b in names["optimizers"]] == [
        ([["startswith", "dadaptation"]], [["endswith", "lion"]], ["dadaptation"]),
        ([["startswith", "prodigy"]], None, ["prodigyopt"]),
        ([["endswith", "8bit"]], [["equals", "adamw8bit"]], ["bitsandbytes"]),
        ([["equals", "adamw"]], None, []),
        (None, [], []),
    ]
    assert set(names["requirements"]) == {"scipy", "prodigyopt", "bitsandbytes", "diffusers"}
    assert loader["env_var"]["pattern"] == r"\$\{([^}]+)\}"
    assert loader["name_tag"] == {"text": "[name]", "source": "toolkit/config.py:12",
                                  "what": loader["name_tag"]["what"]}
    assert loader["float_resolver"]["pattern"] == "^(?:[-+]?[0-9]+[eE][0-9]+)$"
    assert loader["prompt_split"]["text"] == "--"
    assert loader["trigger_placeholders"]["texts"] == ["[name]", "[trigger]"]


def test_a_missing_file_is_a_clear_failure(tmp_path: Path) -> None:
    repo = tmp_path / "empty"
    repo.mkdir()
    (repo / "README").write_text("x")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "one")
    done = subprocess.run([sys.executable, str(SCRIPT), str(repo), "--commit", "HEAD",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode != 0
    assert "cannot read" in done.stderr


@pytest.mark.skipif(not os.environ.get("AITK_CHECKOUT"),
                    reason="set AITK_CHECKOUT to an ai-toolkit clone or mirror")
def test_the_committed_data_is_what_the_script_makes(tmp_path: Path) -> None:
    committed = {p.name: json.loads(p.read_text(encoding="utf-8")) for p in DATA.glob("*.json")}
    commit = committed["names.json"]["commit"]
    assert _run(Path(os.environ["AITK_CHECKOUT"]), commit, tmp_path / "out") == committed
