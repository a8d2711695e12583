"""The MicroK8s catalog: core images, addon images and snap base per release, as the research found them."""

from __future__ import annotations

from pathlib import Path

import pytest

from gapkit.catalog import (
    Release,
    UnknownAddon,
    UnknownRelease,
    channel,
    known_release_names,
    release,
    releases,
)
from gapkit.errors import UsageError

RESEARCH = Path(__file__).resolve().parents[3] / "shared" / "data" / "microk8s"
DATA = Path(__file__).resolve().parents[2] / "gapkit" / "catalog" / "data"
CLASSIC = [f"1.{n}" for n in range(22, 37)]
STRICT = [f"1.{n}-strict" for n in range(25, 36)]
EKSD = [f"1.{n}-eksd" for n in range(22, 26)]


def refs(images: object) -> list[str]:
    return [str(image.reference) for image in images]  # type: ignore[attr-defined]


def core_of(name: str, component: str) -> list[str]:
    return [str(i.reference) for i in release(name).core_images() if i.name == component]


def test_catalog_covers_1_22_to_1_36_classic_strict_and_eksd() -> None:
    assert [r.name for r in releases()] == sorted(CLASSIC + STRICT + EKSD, key=lambda n: (
        int(n.split("-")[0].split(".")[1]), ["", "strict", "eksd"].index(n.partition("-")[2])))
    assert known_release_names()[-2:] == ("master", "latest")


@pytest.mark.parametrize("name", CLASSIC + STRICT + EKSD)
def test_each_release_starts_with_one_pause_three_calico_and_coredns_from_1_27(name: str) -> None:
    rel = release(name)
    assert len(core_of(name, "pause")) == 1
    calico = core_of(name, "calico")
    assert len(calico) >= 3
    assert {c.split(":")[0].rsplit("/", 1)[-1] for c in calico} >= {"cni", "node", "kube-controllers"}
    coredns = core_of(name, "coredns")
    if rel.version_tuple >= (1, 27):
        assert coredns and all("coredns/coredns" in c for c in coredns)
    else:
        assert coredns == []
        assert any("coredns" in r for r in refs(rel.addon_images("dns")))


@pytest.mark.parametrize(("name", "pause"), [
    ("1.22", "k8s.gcr.io/pause:3.1"), ("1.23", "k8s.gcr.io/pause:3.1"), ("1.24", "k8s.gcr.io/pause:3.1"),
    ("1.25", "k8s.gcr.io/pause:3.7"), ("1.25-strict", "k8s.gcr.io/pause:3.7"),
    ("1.26", "registry.k8s.io/pause:3.7"), ("1.27", "registry.k8s.io/pause:3.7"),
    ("1.31", "registry.k8s.io/pause:3.7"), ("1.32", "registry.k8s.io/pause:3.10"),
    ("1.35-strict", "registry.k8s.io/pause:3.10"), ("1.36", "registry.k8s.io/pause:3.10"),
    ("1.23-eksd", "public.ecr.aws/eks-distro/kubernetes/pause:v1.23.17-eks-1-23-33"),
])
def test_pause_is_the_sandbox_image_of_that_releases_containerd_template(name: str, pause: str) -> None:
    assert core_of(name, "pause") == [pause]


def test_calico_of_1_27_is_the_three_v3_25_0_images() -> None:
    assert sorted(core_of("1.27", "calico")) == [
        "docker.io/calico/cni:v3.25.0", "docker.io/calico/kube-controllers:v3.25.0",
        "docker.io/calico/node:v3.25.0"]


@pytest.mark.parametrize(("name", "flexvol"),
                         [("1.22", True), ("1.24", True), ("1.25", False), ("1.36", False)])
def test_pod2daemon_flexvol_only_where_calico_yaml_has_it(name: str, flexvol: bool) -> None:
    assert any("pod2daemon-flexvol" in c for c in core_of(name, "calico")) is flexvol


def test_1_30_strict_keeps_calico_kube_controllers_that_its_images_txt_lost() -> None:
    assert "docker.io/calico/kube-controllers:v3.25.1" in core_of("1.30-strict", "calico")
    assert "docker.io/calico/kube-controllers:v3.25.1" not in map(str, release("1.30-strict").images_txt())


@pytest.mark.parametrize(("name", "base", "confinement"), [
    ("1.22", "core18", "classic"), ("1.26", "core18", "classic"), ("1.26-strict", "core18", "strict"),
    ("1.27", "core20", "classic"), ("1.33", "core20", "classic"), ("1.33-strict", "core20", "strict"),
    ("1.34", "core22", "classic"), ("1.35-strict", "core22", "strict"), ("1.36", "core22", "classic"),
    ("1.25-eksd", "core18", "classic"),
])
def test_snap_base_and_confinement(name: str, base: str, confinement: str) -> None:
    rel = release(name)
    assert (rel.snap_base, rel.confinement) == (base, confinement)


@pytest.mark.parametrize(("text", "name"), [
    ("1.32", "1.32"), ("1.32/stable", "1.32"), ("1.32-strict", "1.32-strict"),
    ("1.32-strict/stable", "1.32-strict"), ("v1.32", "1.32"), ("v1.32.3", "1.32"), (" 1.32 ", "1.32"),
    ("1.32/edge/hotfix-1", "1.32"), ("1.24-eksd/candidate", "1.24-eksd"),
    ("latest", "1.36"), ("master", "1.36"), ("latest/stable", "1.36"), ("1.36", "1.36"),
])
def test_release_accepts_versions_tracks_and_channels(text: str, name: str) -> None:
    assert release(text).name == name


def test_channel_keeps_the_track_and_risk_given() -> None:
    assert str(channel("1.32-strict/edge")) == "1.32-strict/edge"
    assert str(channel("v1.32")) == "1.32/stable"
    latest = channel("latest")
    assert (str(latest), latest.release.name) == ("latest/stable", "1.36")
    assert release("1.32").channel() == "1.32/stable"


@pytest.mark.parametrize("text",
                         ["1.21", "1.22-strict", "1.36-strict", "1.32/unstable", "1.32//", "nginx", ""])
def test_unknown_release_is_a_usage_error_listing_the_known_ones(text: str) -> None:
    with pytest.raises(UnknownRelease) as caught:
        release(text)
    assert isinstance(caught.value, UsageError) and caught.value.exit_code == 2
    hint = caught.value.hint or ""
    for known in ("1.22", "1.25-strict", "1.35-strict", "1.25-eksd", "1.36", "latest"):
        assert known in hint


def test_ingress_is_traefik_in_1_35_and_the_nginx_controller_in_1_32() -> None:
    assert refs(release("1.35").addon_images("ingress")) == ["docker.io/library/traefik:v3.6.2"]
    assert refs(release("1.32").addon_images("ingress")) == [
        "registry.k8s.io/ingress-nginx/controller:v1.13.8"]


def test_addon_images_of_1_35() -> None:
    rel = release("1.35")
    assert refs(rel.addon_images("dns")) == ["docker.io/coredns/coredns:1.13.1"]
    assert refs(rel.addon_images("hostpath-storage")) == [
        "docker.io/cdkbot/hostpath-provisioner:1.6.0", "docker.io/library/busybox:1.28.4"]
    assert refs(rel.addon_images("metrics-server")) == [
        "registry.k8s.io/metrics-server/metrics-server:v0.8.0"]
    assert refs(rel.addon_images("registry")) == ["docker.io/library/registry:2.8.3"]
    assert refs(rel.addon_images("metallb")) == ["quay.io/metallb/controller:v0.15.2",
                                                "quay.io/metallb/speaker:v0.15.2"]
    assert len(rel.addon_images("cert-manager")) == 5
    assert "docker.io/library/kong:3.9" in refs(rel.addon_images("dashboard"))
    assert len(rel.addon_images("observability")) == 12
    assert rel.addon_images("helm") == rel.addon_images("helm3") == ()


@pytest.mark.skipif(not RESEARCH.is_dir(), reason="the research folder is not next to the repository")
@pytest.mark.parametrize("addon", ["dns", "hostpath-storage", "ingress", "metrics-server", "dashboard",
                                   "registry", "metallb", "cert-manager", "observability", "helm"])
def test_addons_of_1_35_match_the_researched_addon_files(addon: str) -> None:
    lines = (RESEARCH / "addons" / f"{addon}.txt").read_text().splitlines()
    expected = [line for line in lines if line.strip() and not line.startswith("#")]
    assert sorted(refs(release("1.35").addon_images(addon))) == sorted(expected)


@pytest.mark.skipif(not RESEARCH.is_dir(), reason="the research folder is not next to the repository")
def test_shipped_data_files_are_byte_copies_of_the_research_data() -> None:
    pairs = [(DATA / "core-by-branch.tsv", RESEARCH / "images" / "core-by-branch.tsv"),
             (DATA / "addon-images-by-version.tsv", RESEARCH / "addons" / "addon-images-by-version.tsv"),
             (DATA / "snap-bases.txt", RESEARCH / "snap-bases.txt")]
    pairs += [(f, RESEARCH / "images" / f.name) for f in sorted((DATA / "images").iterdir())]
    for ours, theirs in pairs:
        assert ours.read_bytes() == theirs.read_bytes(), ours.name


def test_unknown_addon_lists_the_addons_of_that_release() -> None:
    with pytest.raises(UnknownAddon) as caught:
        release("1.32").addon_images("nosuch")
    assert caught.value.exit_code == 2
    assert "'nosuch'" in caught.value.message
    assert "cert-manager, dashboard, dns, helm, helm3, hostpath-storage, ingress, metallb, metrics-server, " \
           "registry" in (caught.value.hint or "")


@pytest.mark.parametrize(("name", "addon"), [
    ("1.24", "dashboard"), ("1.33", "dashboard"), ("1.36", "dashboard"), ("1.30", "observability"),
    ("1.24-eksd", "metallb")])
def test_addon_without_data_for_a_release_says_where_it_has_data(name: str, addon: str) -> None:
    with pytest.raises(UnknownAddon) as caught:
        release(name).addon_images(addon)
    assert f"no image data for addon '{addon}' in MicroK8s {name}" in caught.value.message
    assert "(it has for 1." in caught.value.message
    assert "--image" in (caught.value.hint or "")


def test_addons_before_1_28_come_from_images_txt_and_say_so() -> None:
    rel = release("1.24")
    assert rel.addons() == ("dns", "helm", "helm3", "hostpath-storage", "ingress", "metrics-server")
    (ingress,) = rel.addon_images("ingress")
    assert str(ingress.reference) == "k8s.gcr.io/ingress-nginx/controller:v1.5.1"
    assert ingress.source == "addon:ingress (microk8s 1.24, from images.txt)"
    (dns,) = rel.addon_images("dns")  # coredns.yaml (core-by-branch.tsv) beats images.txt when it has the row
    assert (str(dns.reference), dns.from_images_txt) == ("docker.io/coredns/coredns:1.9.0", False)
    assert [i.from_images_txt for i in release("1.22").addon_images("dns")] == [True]


def test_eksd_images_all_come_from_its_images_txt() -> None:
    rel = release("1.23-eksd")
    assert all(i.from_images_txt for i in rel.core_images())
    assert refs(rel.addon_images("dns")) == ["public.ecr.aws/eks-distro/coredns/coredns:v1.8.7-eks-1-23-33"]
    assert rel.notes and "eksd" in rel.notes[0]


def test_1_32_strict_carries_the_ingress_tag_its_published_snap_runs_and_the_branch_one() -> None:
    images = release("1.32-strict").addon_images("ingress")
    assert refs(images) == ["registry.k8s.io/ingress-nginx/controller:v1.13.8",
                            "registry.k8s.io/ingress-nginx/controller:v1.11.5"]
    assert [i.from_images_txt for i in images] == [False, True]


def test_1_36_is_built_from_master_and_carries_the_tags_of_its_tag_images_txt_too() -> None:
    rel = release("1.36")
    assert rel.aliases == ("master", "latest")
    assert core_of("1.36", "coredns") == ["docker.io/coredns/coredns:1.14.3",
                                          "docker.io/coredns/coredns:1.13.1"]
    assert refs(rel.addon_images("ingress")) == ["docker.io/library/traefik:v3.6.13",
                                                 "docker.io/library/traefik:v3.6.2"]
    assert any("master" in note for note in rel.notes)


STALE_IMAGES_TXT = {
    "1.30-strict": ([], ["docker.io/calico/kube-controllers:v3.25.1"]),
    "1.32-strict": ([], ["registry.k8s.io/ingress-nginx/controller:v1.13.8"]),
    "1.33": (["docker.io/coredns/coredns:1.12.0", "registry.k8s.io/ingress-nginx/controller:v1.12.1"],
             ["docker.io/coredns/coredns:1.12.1", "registry.k8s.io/ingress-nginx/controller:v1.13.8"]),
    "1.34": (["docker.io/cdkbot/hostpath-provisioner:1.5.0",
              "registry.k8s.io/ingress-nginx/controller:v1.13.1"],
             ["docker.io/cdkbot/hostpath-provisioner:1.6.0",
              "registry.k8s.io/ingress-nginx/controller:v1.13.8"]),
    "1.36": ([], ["docker.io/coredns/coredns:1.14.3", "docker.io/library/traefik:v3.6.13",
                  "registry.k8s.io/metrics-server/metrics-server:v0.8.1"]),
}
STALE_IMAGES_TXT["1.33-strict"] = STALE_IMAGES_TXT["1.33"]
STALE_IMAGES_TXT["1.34-strict"] = STALE_IMAGES_TXT["1.34"]


@pytest.mark.parametrize("rel", releases(), ids=str)
def test_images_txt_differs_from_the_catalog_only_where_it_is_known_to_be_stale(rel: Release) -> None:
    diff = rel.images_txt_differences()
    got = ([str(r) for r in diff.only_in_images_txt], [str(r) for r in diff.only_in_catalog])
    assert got == STALE_IMAGES_TXT.get(rel.name, ([], []))


def test_enabling_an_addon_enables_what_microk8s_enables_with_it() -> None:
    rel = release("1.35")
    assert rel.expand_addons(["registry"]) == (("registry", None), ("hostpath-storage", "registry"))
    assert rel.expand_addons(["observability", "dns"]) == (
        ("observability", None), ("dns", None), ("hostpath-storage", "observability"))
    assert dict(rel.expand_addons(["dashboard", "cert-manager"])) == {
        "dashboard": None, "cert-manager": None, "metrics-server": "dashboard", "dns": "cert-manager"}


@pytest.mark.parametrize(("given", "addon"), [("storage", "hostpath-storage"), ("core/dns", "dns"),
                                              ("dns:10.0.0.53", "dns"), ("DNS", "dns"), ("helm3", "helm3")])
def test_addon_names_as_microk8s_enable_takes_them(given: str, addon: str) -> None:
    assert release("1.32").expand_addons([given]) == ((addon, None),)


def test_addon_notes_warn_about_charts_fetched_at_enable_time_and_unverified_tags() -> None:
    assert any("Gateway API" in n for n in release("1.35").addon_notes("ingress"))
    assert release("1.32").addon_notes("ingress") == ()
    assert any("promtail" in n and "not known" in n for n in release("1.34").addon_notes("observability"))
    assert any("INFERRED" in n for n in release("1.35").addon_notes("observability"))


def test_release_to_json_has_base_core_and_addons() -> None:
    data = release("1.27").to_json()
    assert data["snap_base"] == "core20" and data["channel"] == "1.27/stable"
    pause = {"reference": "registry.k8s.io/pause:3.7", "source": "core:pause (microk8s 1.27)"}
    assert pause in data["core_images"]
    assert set(data["addons"]) == set(release("1.27").addons())
