"""Write the 57 subject tasks and the category groups, from lm-eval's own subject list.

Run from this folder: `python _generate_configs.py` (the YAMLs are committed).
"""

from __future__ import annotations

from lm_eval.tasks.mmlu._generate_configs import SUBJECTS

GROUP_HEADER = "# Size-weighted (micro) mean over {what}; run_text_benchmark adds the macro mean.\n"


def main() -> None:
    categories = sorted(set(SUBJECTS.values()))
    for subject, category in SUBJECTS.items():
        words = " ".join(subject.split("_"))
        with open(f"chameleon_mmlu_{subject}.yaml", "w", encoding="utf-8") as fh:
            fh.write(
                "include: _template_yaml\n"
                f"task: chameleon_mmlu_{subject}\n"
                f'task_alias: "{words}"\n'
                f"tag: chameleon_mmlu_{category}_tasks\n"
                f'description: "The following are multiple choice questions (with answers) about {words}.\\n\\n"\n'
                "dataset_kwargs:\n"
                f"  subject: {subject}\n"
                "  data_files:\n"
                f"    test: mmlu/test/{subject}_test.csv\n"
                f"    dev: mmlu/dev/{subject}_dev.csv\n"
            )
    for category in categories:
        with open(f"chameleon_mmlu_{category}.yaml", "w", encoding="utf-8") as fh:
            fh.write(
                GROUP_HEADER.format(what=f"the {category} subjects")
                + f"group: chameleon_mmlu_{category}\n"
                f"group_alias: {category}\n"
                f"task:\n  - chameleon_mmlu_{category}_tasks\n"
                "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
                "metadata:\n  version: 2\n"
            )
    with open("chameleon_mmlu.yaml", "w", encoding="utf-8") as fh:
        fh.write(
            GROUP_HEADER.format(what="all 57 subjects")
            + "group: chameleon_mmlu\ntask:\n"
            + "".join(f"  - chameleon_mmlu_{c}\n" for c in categories)
            + "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
            "metadata:\n  version: 2\n"
        )


if __name__ == "__main__":
    main()
