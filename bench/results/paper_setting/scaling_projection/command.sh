cd /work/paper
date
time dit scaling --sizes all --set paths.reports=reports_proj --set interpreter.kind=projection --set data.n_topics=96 --set data.diffs_per_topic=1 --set data.n_trigger=64 \
        --set data.candidates_per_answer=1 \
        --set assemble.split_by=topic --set assemble.test_fraction=0.2 --set assemble.val_fraction=0.1 \
        --set diffs.steps=100 --set diffs.trigger_rows=2 --set diffs.wrong_prefix_rows=2 \
        --set diffs.diffs_per_batch=16 \
        --set assemble.min_trigger_hit=0.5 --set assemble.max_wrong_prefix_hit=0.25 \
        --set assemble.max_no_trigger_hit=0.125 --set eval.n_questions=20
date
