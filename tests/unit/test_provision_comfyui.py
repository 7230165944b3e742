"""scripts/provision_comfyui.sh on a machine without ComfyUI: the order of sources and where it unpacks.

Each case runs the script from a throw-away copy of the checkout, with an empty HOME and a fake ComfyUI (a tree with
main.py and comfy/) as tarball, vendor tarball beside the checkout, or local git repository tagged like upstream."""

import os
import pathlib
import shutil
import subprocess
import tarfile

import pytest

pytestmark = pytest.mark.unit

REPO = pathlib.Path(__file__).resolve().parents[2]


def fake_comfyui(root: pathlib.Path, marker: str) -> pathlib.Path:
    tree = root / "ComfyUI"
    (tree / "comfy").mkdir(parents=True)
    (tree / "main.py").write_text(f"# {marker}\n")
    (tree / "comfyui_version.py").write_text('__version__ = "0.3.64"\n')
    return tree


def tarball(tree: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(tree, arcname="ComfyUI")
    return path


@pytest.fixture
def checkout(tmp_path):
    """A copy of the two files the script needs, in work/main (so work/shared may sit beside it)."""
    main = tmp_path / "work" / "main"
    (main / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "provision_comfyui.sh", main / "scripts")
    shutil.copy(REPO / "comfy_path.py", main)
    return main


def run(checkout, home, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "COMFYUI_ARCHIVE")}
    environ.update(HOME=str(home), **env)
    return subprocess.run(["bash", str(checkout / "scripts" / "provision_comfyui.sh")], env=environ,
                          capture_output=True, text=True, timeout=120)


def test_archive_first_then_vendor(tmp_path, checkout):
    home = tmp_path / "home"
    home.mkdir()
    vendor = checkout.parent / "shared" / "vendor"
    vendor.mkdir(parents=True)
    tarball(fake_comfyui(tmp_path / "v", "vendor"), vendor / "ComfyUI-0.3.64.tar.gz")
    archive = tarball(fake_comfyui(tmp_path / "a", "archive"), tmp_path / "mine.tar.gz")
    done = run(checkout, home, COMFYUI_ARCHIVE=str(archive))
    assert done.returncode == 0, done.stderr
    target = home / "comfy" / "ComfyUI"
    assert done.stdout.strip() == str(target)
    assert (target / "main.py").read_text() == "# archive\n"
    assert "COMFYUI_ARCHIVE" in done.stderr and "installed 0.3.64" in done.stderr
    again = run(checkout, home)  # found now: nothing is unpacked again
    assert again.returncode == 0 and again.stdout.strip() == str(target) and "unpacking" not in again.stderr
    shutil.rmtree(target)
    done = run(checkout, home)
    assert done.returncode == 0, done.stderr
    assert (target / "main.py").read_text() == "# vendor\n" and str(vendor) in done.stderr


def test_empty_comfyui_path_is_the_target_and_a_foreign_one_is_refused(tmp_path, checkout):
    home = tmp_path / "home"
    home.mkdir()
    archive = tarball(fake_comfyui(tmp_path / "a", "archive"), tmp_path / "mine.tar.gz")
    target = tmp_path / "elsewhere" / "ComfyUI"
    done = run(checkout, home, COMFYUI_ARCHIVE=str(archive), COMFYUI_PATH=str(target))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(target) and (target / "main.py").is_file()
    assert not (home / "comfy").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not ComfyUI")
    refused = run(checkout, home, COMFYUI_ARCHIVE=str(archive), COMFYUI_PATH=str(foreign))
    assert refused.returncode != 0 and "neither a ComfyUI checkout" in refused.stderr


def test_git_clone_of_the_tagged_release_without_tarballs(tmp_path, checkout):
    if shutil.which("git") is None:
        pytest.skip("needs git")
    upstream = fake_comfyui(tmp_path / "u", "cloned")
    git = ["git", "-C", str(upstream), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(upstream)], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "v"], check=True)
    subprocess.run(git + ["tag", "v0.3.64"], check=True)
    (upstream / "main.py").write_text("# after the tag\n")
    subprocess.run(git + ["commit", "-qam", "later"], check=True)
    home = tmp_path / "home"
    home.mkdir()
    done = run(checkout, home, COMFYUI_REPO=f"file://{upstream}")
    assert done.returncode == 0, done.stderr
    target = home / "comfy" / "ComfyUI"
    assert (target / "main.py").read_text() == "# cloned\n"  # the tag, not the branch head
    assert "cloning" in done.stderr and "v0.3.64" in done.stderr
