"""A vision-critical toy world in which OPD and VA-OPD can be compared on one CPU.

- ``task``: the generated task (seven-segment digits that pixelation destroys, large coloured
  squares that survive it), its two answer templates (short, scaffolded) and its JSONL splits;
- ``sft``: supervised fine-tuning of the tiny teacher and the warm-started student;
- ``analysis``: accuracy per question kind, the teacher's VA distribution and the student's own
  visual reliance on its rollouts;
- ``digits``: the teacher's VA on the student's correct and wrong digit readings;
- ``readings``: teacher-forced measurements at the digit readings (reading accuracy, VA of
  teacher and student, KL at correct and wrong readings);
- ``compare``: ``python -m vaopd.toy.compare --regime original|paper --out DIR`` runs everything end
  to end.
"""
