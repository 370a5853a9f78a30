//! FHIR R4 validation by a third party: PyPI `fhir.resources` 6.1.0 (strict R4 4.0.1), so the
//! FHIR double is not the only judge of what hiway sends (../shared/protocols.md §9.2).
//!
//! `deploy/fhir-validator.sh` makes the validator's venv the first time (about a minute: pip
//! reaches PyPI) and only checks it afterwards; it runs once per test process. Each
//! validation then pipes one Bundle through `tests/fhir_validate.py`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The venv's Python, made by the deploy script on first use. A failure to make it is an
/// `Err` for every validation, not a skip: a test that validates must not pass unvalidated.
fn python() -> Result<&'static PathBuf, String> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let script = repo_root().join("deploy/fhir-validator.sh");
            let output = Command::new("bash")
                .arg(&script)
                .output()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            if !output.status.success() {
                return Err(format!(
                    "{} failed ({}):\n{}",
                    script.display(),
                    output.status,
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
            let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            Ok(PathBuf::from(path))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Validates a Bundle against FHIR R4 4.0.1; `Err` holds the validator's words (pydantic
/// names each failing field by path, e.g. `entry -> 2 -> resource -> __root__ -> status`).
///
/// Blocking (it runs a process): from async code, call it in `spawn_blocking` or accept the
/// short stall, as tests may.
pub fn validate_r4(bundle: &serde_json::Value) -> Result<(), String> {
    let python = python()?;
    let validator = repo_root().join("tests/fhir_validate.py");
    let mut child = Command::new(python)
        .arg(&validator)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    let input = serde_json::to_vec(bundle).map_err(|e| e.to_string())?;
    {
        let mut stdin = child.stdin.take().ok_or("the validator has no stdin")?;
        stdin
            .write_all(&input)
            .map_err(|e| format!("cannot write to the validator: {e}"))?;
        // Dropped here: the validator reads to end of input.
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("the validator did not finish: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "fhir.resources (R4) rejected the Bundle ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_bundle() -> serde_json::Value {
        let path = repo_root().join("tests/fixtures/fhir/transaction-bundle.json");
        let text = std::fs::read_to_string(&path).expect("the sample transaction bundle");
        serde_json::from_str(&text).expect("the sample is JSON")
    }

    #[test]
    fn the_sample_transaction_bundle_is_valid_r4() {
        assert_eq!(validate_r4(&sample_bundle()), Ok(()));
    }

    #[test]
    fn an_observation_without_status_is_rejected_naming_status() {
        let mut bundle = sample_bundle();
        bundle["entry"][2]["resource"]
            .as_object_mut()
            .expect("the third entry's resource")
            .remove("status");

        let error = validate_r4(&bundle).expect_err("an Observation needs a status in R4");

        assert!(error.contains("status"), "{error}");
        assert!(error.contains("entry -> 2"), "{error}");
    }

    #[test]
    fn an_encounter_class_given_as_a_list_is_rejected_as_r5_shaped() {
        let mut bundle = sample_bundle();
        let class = bundle["entry"][1]["resource"]["class"].clone();
        bundle["entry"][1]["resource"]["class"] = serde_json::json!([class]);

        let error = validate_r4(&bundle).expect_err("Encounter.class is one Coding in R4");

        assert!(error.contains("class"), "{error}");
    }
}
