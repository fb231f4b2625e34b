"""What spec.image and spec.template may ask for: the operator's `security` settings."""

from __future__ import annotations

import pytest
from operator_helpers import job

from embedjob.failures import ConfigError
from embedjob.operator.config import parse_settings
from embedjob.operator.pods import build_pod, check_security
from embedjob.policy import ShardHistory

DEFAULT = parse_settings({"workerImage": "reg.example/worker:1",
                          "workerDefaults": {"serviceAccountName": "embedjob-worker"}})
OPEN = parse_settings({
    "workerImage": "reg.example/worker:1",
    "security": {"allowedImages": ["reg.example/*"], "allowedServiceAccounts": ["team-a"],
                 "allowedVolumeTypes": ["emptyDir", "hostPath"],
                 "allowedRuntimeClasses": ["unconfined"], "allowedSchedulerNames": ["mine"]},
})

REFUSED = [
    # (name, image, template, field named, setting named)
    ("other image", "evil.example/miner:1", {}, "spec.image", "security.allowedImages"),
    ("hostPath", None, {"volumes": [{"name": "root", "hostPath": {"path": "/"}}]},
     "spec.template.volumes[0].hostPath", "security.allowedVolumeTypes"),
    ("inline nfs", None, {"volumes": [{"name": "ok", "emptyDir": {}},
                                      {"name": "n", "nfs": {"server": "s", "path": "/"}}]},
     "spec.template.volumes[1].nfs", "security.allowedVolumeTypes"),
    ("inline csi", None, {"volumes": [{"name": "c", "csi": {"driver": "x"}}]},
     "spec.template.volumes[0].csi", "security.allowedVolumeTypes"),
    ("other service account", None, {"serviceAccountName": "cluster-admin-sa"},
     "spec.template.serviceAccountName", "security.allowedServiceAccounts"),
    ("runtime class", None, {"runtimeClassName": "unconfined"},
     "spec.template.runtimeClassName", "security.allowedRuntimeClasses"),
    ("scheduler", None, {"schedulerName": "mine"}, "spec.template.schedulerName",
     "security.allowedSchedulerNames"),
]


@pytest.mark.parametrize(("image", "template", "field", "setting"), [r[1:] for r in REFUSED],
                         ids=[r[0] for r in REFUSED])
def test_refused_by_default_with_one_line_naming_field_and_setting(
    image, template, field, setting
) -> None:
    refusal = check_security(image, template, DEFAULT)
    assert refusal is not None and refusal.startswith(field) and setting in refusal
    assert "\n" not in refusal
    with pytest.raises(ConfigError, match=setting):
        build_pod(job(image=image, template=template), "index", -1, 0, ShardHistory(), DEFAULT)


ALLOWED = [
    ("no image, no template", None, {}),
    ("the configured image", "reg.example/worker:1", {}),
    ("safe volumes", None, {"volumes": [
        {"name": "a", "emptyDir": {}}, {"name": "b", "configMap": {"name": "c"}},
        {"name": "c", "secret": {"secretName": "s"}},
        {"name": "d", "persistentVolumeClaim": {"claimName": "data"}},
        {"name": "e"}]}),  # no source: the API server makes it an emptyDir
    ("the workers' own service account", None, {"serviceAccountName": "embedjob-worker"}),
]


@pytest.mark.parametrize(("image", "template"), [r[1:] for r in ALLOWED],
                         ids=[r[0] for r in ALLOWED])
def test_allowed_by_default(image, template) -> None:
    assert check_security(image, template, DEFAULT) is None


@pytest.mark.parametrize(("image", "template"), [r[1:3] for r in REFUSED if r[0] not in (
    "inline nfs", "inline csi", "other service account")], ids=lambda v: str(v)[:20])
def test_settings_allow_what_they_list(image, template) -> None:
    if image:
        image = "reg.example/other:2"
    assert check_security(image, template, OPEN) is None


def test_default_service_account_only_when_it_is_the_workers_own() -> None:
    assert check_security(None, {"serviceAccountName": "default"}, OPEN) is None
    assert check_security(None, {"serviceAccountName": "default"}, DEFAULT) is not None


def test_listed_service_account_allowed_and_glob_is_not_a_prefix_trick() -> None:
    assert check_security(None, {"serviceAccountName": "team-a"}, OPEN) is None
    assert check_security("reg.example.evil.com/x", {}, OPEN) is not None
