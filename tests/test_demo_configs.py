"""configs/demo_continue.py continues configs/demo.py's backbone (issue 23)."""

from configs import demo, demo_continue


def test_continue_config_loads_the_demo_backbone_on_other_data():
    base, cont = demo.get_config(), demo_continue.get_config()
    # The same architecture, so the demo's exported backbone loads as init.checkpoint.
    assert cont.model.to_dict() == base.model.to_dict()
    assert (cont.data.global_size, cont.data.local_size) == (
        base.data.global_size,
        base.data.local_size,
    )
    # Its own data (continue_demo.sh sets data.dir/name) and a shorter run than the demo.
    assert not cont.data.builtin and base.data.builtin
    assert 0 < cont.total_steps < base.total_steps
    assert cont.optim.freeze_backbone_steps == 0  # the script sets the phase per run
    assert cont.optim.warmup_steps <= cont.total_steps // 2
