"""hosl/provenance.py: the commit and clean-tree flag every result JSON records, from git, else from
the GIT_COMMIT file a copy of the tree carries, else None (unknown, never a guess)."""

import json
import shutil
import subprocess

import pytest

from hosl.provenance import checkout_state, main, stamped, write_commit_file

SHA = "0123456789abcdef0123456789abcdef01234567"
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="no git")


def _repo(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "one")
    return git


@needs_git
def test_git_clean_then_dirty(tmp_path):
    _repo(tmp_path)
    clean = checkout_state(tmp_path)
    assert clean["commit_source"] == "git" and len(clean["commit"]) == 40 and clean["dirty"] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    dirty = checkout_state(tmp_path)
    assert dirty["commit"] == clean["commit"] and dirty["dirty"] is True and dirty["dirty_files"] == ["a.py"]


@needs_git
def test_the_commit_file_travels_with_a_copy_without_git(tmp_path):
    repo, copy = tmp_path / "repo", tmp_path / "copy"
    repo.mkdir()
    _repo(repo)
    written = write_commit_file(repo)
    assert checkout_state(repo)["dirty"] is False  # the file itself does not make the tree dirty
    copy.mkdir()
    shutil.copy(written, copy / "GIT_COMMIT")  # what a copy of the tree (no .git) carries
    state = checkout_state(copy)
    assert (state["commit"], state["dirty"], state["commit_source"]) == (checkout_state(repo)["commit"], False,
                                                                          "GIT_COMMIT")


@pytest.mark.parametrize("text,commit,dirty", [
    (f"{SHA}\ndirty\n", SHA, True),
    (f"{SHA}\n", SHA, None),  # no flag: unknown
    ("not-a-commit\nclean\n", None, None),  # a malformed file is not read as a commit
])
def test_commit_file_forms(tmp_path, text, commit, dirty):
    (tmp_path / "GIT_COMMIT").write_text(text)
    state = checkout_state(tmp_path)
    assert (state["commit"], state["dirty"]) == (commit, dirty)


def test_neither_git_nor_file_is_unknown(tmp_path):
    state = checkout_state(tmp_path)
    assert state["commit"] is None and state["dirty"] is None and state["commit_source"] is None


def test_stamped_goes_into_meta_where_there_is_one(tmp_path):
    (tmp_path / "GIT_COMMIT").write_text(f"{SHA}\nclean\n")
    rows = stamped({"op[a]": {"x": 1}, "meta": {"cut": 5}}, tmp_path)
    assert set(rows) == {"op[a]", "meta"} and rows["meta"]["provenance"]["commit"] == SHA
    flat = stamped({"rows": []}, tmp_path)
    assert flat["provenance"]["dirty"] is False


def test_write_refuses_without_git(tmp_path, capsys):
    with pytest.raises(RuntimeError, match="--write needs git"):
        main(["--write", "--root", str(tmp_path)])
    assert not (tmp_path / "GIT_COMMIT").exists()
    main(["--root", str(tmp_path)])
    assert json.loads(capsys.readouterr().out)["commit"] is None
