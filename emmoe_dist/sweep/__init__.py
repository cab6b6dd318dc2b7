"""Expert-subset sweeps: one Ray Tune trial per (dataset, expert selection, rank, lr, bits).

    config   the sweep file (typed; errors name file, line and field)
    space    the trials, built from the model and its routing profiles (plan.json)
    settings what every trial of a sweep shares
    trial    one trial: fine-tune -> generate -> judge -> metrics, resumable stage by stage
    tuner    the Tune driver: resources, concurrency, retries, restore
    summary  the paper's tables over every finished trial (summary.md / summary.json)
    wandb_views  one W&B run per trial and one for the summary, written from the records

Ray is imported only inside `trial` and `tuner` functions; the trial's training and
generation run as subprocesses (`launch/ft.py`, `emmoe generate`) that know nothing of Ray.
"""
