"""tools/ptq.py: a failure nobody anticipated is still one 'error:' line (no traceback)."""
import pytest


def test_unparsable_config_is_one_error_line(tmp_path):
    from tools.ptq import main
    config = tmp_path / 'bad.py'
    config.write_text("_base_ = ['does_not_exist.py']\n")
    with pytest.raises(SystemExit) as info:
        main([str(config), '--checkpoint', str(tmp_path / 'fp.pth')])
    message = str(info.value)
    assert message.startswith(f'error: {config}: unexpected FileNotFoundError in ') and '\n' not in message
    assert 'does_not_exist.py' in message and message.endswith('QDROP_MM_TRACEBACK=1 shows the traceback)')
