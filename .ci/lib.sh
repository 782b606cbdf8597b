# Shared by .ci/check_lowest.sh and .ci/check_newest.sh (sourced, not run).

# copy_tree DEST: the checkout's tracked and untracked-not-ignored files into DEST. An install
# writes hosl/_build_config.py, which must not change the main checkout's (its .venv was built
# with the extensions).
copy_tree() {
    git ls-files -co --exclude-standard -z | tar --null -cf - -T - | tar -xf - -C "$1"
}

# run_subset PYTHON: the tests of .ci/subset_tests.txt, fast tier, from the current folder.
run_subset() {
    local files
    mapfile -t files < <(grep -v '^#' "$CI_DIR/subset_tests.txt" | sed '/^$/d')
    "$1" -m pytest -q -p no:cacheprovider "${files[@]}" -m "not slow"
}
