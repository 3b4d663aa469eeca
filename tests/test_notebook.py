"""The Colab notebook is a valid notebook and runs the README's commands."""

import nbformat

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def notebook():
    return nbformat.read(ROOT / "Img2GPT_colab.ipynb", as_version=4)


def test_notebook_is_valid_and_unexecuted():
    nb = notebook()
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    assert nb.metadata["accelerator"] == "GPU"
    assert "Img2GPT_colab.ipynb" in README  # linked


def test_notebook_commands_are_the_readme_commands():
    nb = notebook()
    lines = [line for cell in nb.cells if cell.cell_type == "code" for line in cell.source.splitlines()]
    commands = [line for line in lines if line.startswith(("!", "%"))]
    assert [c.split()[1] for c in commands if c.startswith("!python")] == ["training_script.py", "inference_script.py"]
    # one train cell, right the first time and after every disconnect
    assert "!python training_script.py --output-dir {OUTPUT_DIR} --kaggle-dataset {KAGGLE_DATASET} --resume auto" in commands
    assert "adityajn105/flickr8k" in source_of(nb)  # Flickr8k offered as a quick first run
    for command in commands:
        assert f"\n{command}\n" in README, command
    source = "\n".join(lines)
    assert 'drive.mount("/content/drive")' in source and "USE_DRIVE" in source
    assert "loss.png" in source and '"samples"' in source


def source_of(nb):
    return "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")


def test_the_last_cell_shows_the_evaluation_gallery():
    last = notebook().cells[-1]
    assert last.cell_type == "code" and "display(HTML(" in last.source
    assert 'f"{OUTPUT_DIR}/eval_img2gpt_epoch_3.html"' in last.source  # what the train cell's evaluation writes
