"""The files the benchmarks' servers take, as the original's convert_*_for_submission.py write them: VQAv2 and
VizWiz as JSON for their EvalAI servers (the answers EvalAI-normalised), MMBench as the .xlsx its server takes
(written by a small standard-library xlsx writer). Each writer takes the benchmark, its folder, the answers
{(question_id, prompt): answer}, the questions and the path to write. Standard library only."""
import io
import os
import zipfile
from xml.sax.saxutils import escape

from minillava.eval_files import EvalError, is_missing, key, read_jsonl, read_tsv, write_atomic, write_json_atomic
from minillava.eval_scores import evalai_normalize


def submission_vqav2(bench, data, answers, questions, path):
    """convert_vqav2_for_submission.py: every question of test2015, in its file's order, with its EvalAI-normalised
    answer, or '' where test-dev did not ask (or the model did not answer) it."""
    by_id = {qid: a["text"] for (qid, _), a in answers.items()}
    split = [q for _, q in read_jsonl(os.path.join(data, "llava_vqav2_mscoco_test2015.jsonl"))]
    write_json_atomic(path, [{"question_id": q["question_id"], "answer": evalai_normalize(by_id[q["question_id"]])
                              if q["question_id"] in by_id else ""} for q in split])


def submission_vizwiz(bench, data, answers, questions, path):
    """convert_vizwiz_for_submission.py: {"image", "answer"} for every question, which must all be answered."""
    missing = [q["question_id"] for q in questions if key(q) not in answers]
    if missing:
        raise EvalError(f"vizwiz: {len(missing)} question(s) have no answer (first: {missing[0]!r}); the "
                        "submission needs them all: run `answer` again to complete the answers file")
    write_json_atomic(path, [{"image": q["image"], "answer": evalai_normalize(answers[key(q)]["text"])}
                             for q in questions])


def submission_mmbench(bench, data, answers, questions, path):
    """convert_mmbench_for_submission.py: the TSV without its hint, category, source, image, comment and
    l2-category columns, a "prediction" column inserted as the 7th (the answer's text; with several rounds, the
    last in the answers file, as the original's overwriting leaves it), as .xlsx; columns whose every value
    is an integer are written as numbers, as pandas reads them."""
    columns, rows = read_tsv(os.path.join(data, bench.questions))
    keep = [c for c in columns if c not in ("hint", "category", "source", "image", "comment", "l2-category")]
    header = keep[:6] + ["prediction"] + keep[6:]
    prediction = {qid: a["text"] for (qid, _), a in answers.items()}
    numeric = {c for c in keep if all(is_missing(r[c]) or r[c].lstrip("-").isdigit() for _, r in rows)}
    table = [[None if is_missing(r[c]) else int(r[c]) if c in numeric else r[c] for c in keep] for _, r in rows]
    for row, (_, r) in zip(table, rows):
        row.insert(6, prediction.get(int(r["index"])))
    write_atomic(path, xlsx_bytes(header, table))


def xlsx_bytes(header: list, rows: list) -> bytes:
    """A one-sheet Excel workbook from the standard library: the four Office Open XML parts in a zip; strings
    inline, numbers as numbers, None as no cell (what pandas' to_excel writes, less the styles)."""
    def column(i):  # 0 -> A, 25 -> Z, 26 -> AA
        return column(i // 26 - 1) + chr(65 + i % 26) if i >= 26 else chr(65 + i)

    def cell(ref, v):
        if v is None:
            return ""
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f'<c r="{ref}"><v>{v}</v></c>'
        text = escape("".join(ch for ch in str(v) if ch in "\t\n\r" or ord(ch) >= 32))  # XML 1.0's characters
        return f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{text}</t></is></c>'

    sheet = "".join(f'<row r="{r}">' + "".join(cell(f"{column(c)}{r}", v) for c, v in enumerate(values)) + "</row>"
                    for r, values in enumerate([header] + rows, 1))
    ns, rel = "http://schemas.openxmlformats.org", "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    ct = "application/vnd.openxmlformats-officedocument.spreadsheetml"
    parts = {
        "[Content_Types].xml": f'<Types xmlns="{ns}/package/2006/content-types"><Default Extension="rels" '
        'ContentType="application/vnd.openxmlformats-package.relationships+xml"/><Default Extension="xml" '
        f'ContentType="application/xml"/><Override PartName="/xl/workbook.xml" ContentType="{ct}.sheet.main+xml"/>'
        f'<Override PartName="/xl/worksheets/sheet1.xml" ContentType="{ct}.worksheet+xml"/></Types>',
        "_rels/.rels": f'<Relationships xmlns="{ns}/package/2006/relationships"><Relationship Id="rId1" '
        f'Type="{rel}/officeDocument" Target="xl/workbook.xml"/></Relationships>',
        "xl/workbook.xml": f'<workbook xmlns="{ns}/spreadsheetml/2006/main" xmlns:r="{rel}"><sheets><sheet '
        'name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>',
        "xl/_rels/workbook.xml.rels": f'<Relationships xmlns="{ns}/package/2006/relationships"><Relationship '
        f'Id="rId1" Type="{rel}/worksheet" Target="worksheets/sheet1.xml"/></Relationships>',
        "xl/worksheets/sheet1.xml": f'<worksheet xmlns="{ns}/spreadsheetml/2006/main"><sheetData>{sheet}'
        '</sheetData></worksheet>'}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, xml in parts.items():
            z.writestr(name, '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n' + xml)
    return buf.getvalue()


SUBMITTERS = {"vqav2": submission_vqav2, "vizwiz": submission_vizwiz, "mmbench": submission_mmbench,
              "mmbench_cn": submission_mmbench}
